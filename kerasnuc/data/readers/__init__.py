"""One module per dataset format; each exposes ``read(path, **options) -> list[NucleiImage]``."""
