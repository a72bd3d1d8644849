"""A dynamic-metadata provider (pyproject.toml): the wheel depends on the torch major.minor of the
environment that builds it, since its binaries link that torch's C++ libraries
(loadkit/__init__.py checks the same at import)."""
import importlib.metadata


def dynamic_metadata(settings, project):
    if settings:
        raise ValueError(f"torch_pin takes no settings, got {sorted(settings)}")
    try:
        version = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        raise RuntimeError("loadkit is built against torch: install torch in the build environment "
                           "(or build with isolation, which installs it)") from None
    major, minor = version.split("+")[0].split(".")[:2]
    return {"dependencies": [f"torch=={major}.{minor}.*"]}


def dynamic_wheel(settings):
    # The sdist cannot know it: the torch of whoever builds the wheel decides.
    return {"dependencies": True}
