"""The HTTP face of inpaint-server and its command line. Imports torch only through ``pipelines``."""
