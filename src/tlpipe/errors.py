"""The one exception type users see."""


class TlpipeError(Exception):
    """A problem the user can fix (bad file, bad param, missing data, unreachable server).

    The message says what was wrong and what to do. The CLI prints it on one line and exits
    with status 1, without a traceback.
    """


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived (a pod being stopped, `kill`, `tlpipe run` stopping its stages).

    A KeyboardInterrupt, so it unwinds like Ctrl-C: tracking runs end KILLED, temporary outputs
    are removed, resume files are kept.
    """
