"""Messages that leave the server: no stack traces and no local file-system paths.

Error texts often come from deep inside libraries (``FileNotFoundError: [Errno 2] No such file or
directory: '/srv/models/...'``). The full text goes to the server log; what a client sees (job errors,
status logs, readiness) goes through :func:`public_message` first.
"""

from __future__ import annotations

import re

_TRACEBACK = "Traceback (most recent call last)"
# An absolute path with at least one folder: /a/b, ~/a/b, C:\a\b. Not the path of a URL (http://host/a/b)
# nor a ratio (1/4): the character before the first separator must not be part of a word, host or URL.
_PATH = re.compile(r"(?<![\w.:/\\~-])(?:~|[A-Za-z]:)?[/\\](?:[\w.@+-]+[/\\])+[\w.@+-]*")
_SOURCE_LINE = re.compile(r'File "[^"]*", line \d+')
PATH_PLACEHOLDER = "<path>"


def public_message(text: str) -> str:
    """``text`` without tracebacks and local paths, for answers to clients."""
    if _TRACEBACK in text:
        before, _, after = text.partition(_TRACEBACK)
        lines = [line for line in after.strip().splitlines() if line.strip()]
        # Python's last traceback line is "ExceptionType: message"; keep that when nothing came before.
        text = before.strip() or (lines[-1].strip() if lines else "internal error")
    text = _SOURCE_LINE.sub("", text)
    return _PATH.sub(PATH_PLACEHOLDER, text)
