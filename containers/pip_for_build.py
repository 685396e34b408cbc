"""Write a pip.conf for `docker build --secret id=pip.conf` from this machine's pip config.

Local package folders (find-links, file:// indexes) are not reachable from inside a build, so
they are served over HTTP on 127.0.0.1 (the build uses host networking) from one folder of
symlinks; remote indexes pass through unchanged. Nothing here ends up in an image layer.

    python3 containers/pip_for_build.py SERVE_DIR PORT > pip.conf
"""

import subprocess
import sys
from pathlib import Path

LIST_KEYS = ("index-url", "extra-index-url", "find-links")


def _host_config() -> dict[str, list[str]]:
    out = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, check=True
    ).stdout
    found: dict[str, list[str]] = {}
    for line in out.splitlines():
        key, _, value = line.partition("=")
        name = key.rsplit(".", 1)[-1]
        if name in (*LIST_KEYS, "timeout", "default-timeout"):
            for item in value.strip("'\"").split():
                if item not in found.setdefault(name, []):
                    found[name].append(item)
    return found


def main(serve_dir: Path, port: int) -> None:
    serve_dir.mkdir(parents=True, exist_ok=True)
    lines = ["[global]"]
    for key, values in _host_config().items():
        mapped = []
        for value in values:
            path = value.removeprefix("file://")
            if path.startswith("/"):  # a local folder: serve it
                # A simple index's pages link to ../../files/: serve its parent folder.
                local = Path(path.rstrip("/"))
                root, sub = (local.parent, local.name) if key != "find-links" else (local, "")
                link = serve_dir / f"d{len(list(serve_dir.iterdir()))}"
                link.symlink_to(root)
                value = f"http://127.0.0.1:{port}/{link.name}/{sub}".rstrip("/") + "/"
            mapped.append(value)
        key = "timeout" if key == "default-timeout" else key
        lines.append(f"{key} = {' '.join(mapped)}")
    # The host's CA bundle (a TLS-inspecting proxy's CA may be in it), given as secret ca.crt.
    lines.append("cert = /run/secrets/ca.crt")
    print("\n".join(lines))


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]))
