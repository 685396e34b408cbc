"""Pipeline steps: each module has one `run(inputs..., cfg) -> Result` function."""
