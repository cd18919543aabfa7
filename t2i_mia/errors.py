"""Error types with messages that name the file, line, key or tensor at fault."""


class T2IMiaError(Exception):
    """Base class: every user-facing error of the package."""


class ConfigError(T2IMiaError, ValueError):
    """A config key is unknown, has the wrong type, or a value we do not implement."""


class DataError(T2IMiaError, ValueError):
    """Input data is malformed: corrupt image, bad caption, bad manifest line, overlap."""


class CheckpointError(T2IMiaError, ValueError):
    """A checkpoint folder is missing files or tensors, or a tensor has the wrong shape."""
