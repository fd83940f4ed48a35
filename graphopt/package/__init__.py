"""Edge packaging: the verified bundle (`bundle`), the runtimes it is checked against
(`targets`, TOML presets) and the ORT-format conversion made reproducible (`ortformat`)."""

from graphopt.package.bundle import PackageOptions, package

__all__ = ["PackageOptions", "package"]
