"""The HTTP face of inpaint-server and its command line. Imports torch only through ``pipelines``."""

from importlib import metadata

try:
    __version__ = metadata.version("inpaint-server")
except metadata.PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"
