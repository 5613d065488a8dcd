"""Credentials out of what imgcls prints and logs: `scheme://user:password@host` -> `user:***@`.

A tracking URI may carry a login (`http://alice:s3cret@mlflow:5000`,
`postgresql://mlflow:pw@db/mlflow`). `redact_uri` is for a URI about to be shown;
`redact_text` finds every such URI inside a longer text (an exception message, a log
line); `RedactingFilter` applies it to log records, and `redact_logs()` puts it on the
handlers that emit them, so a record of any logger is covered.
"""

from __future__ import annotations

import logging
import re

MASK = "***"
# scheme://userinfo@ : the userinfo (no '/', whitespace or '@' inside) is what is hidden.
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]*://)(?P<userinfo>[^/\s@'\"<>]+)@")
# Query parameters that carry a secret (presigned URLs, connection strings).
_SECRET_PARAM = re.compile(
    r"(?P<key>[?&;](?:password|passwd|pwd|token|access_token|secret|api_key|apikey|"
    r"X-Amz-Signature|X-Amz-Credential|sig)=)(?P<value>[^&;\s'\"]+)",
    re.IGNORECASE,
)


def _mask_userinfo(match: re.Match) -> str:
    user, sep, _password = match["userinfo"].partition(":")
    # user:password keeps the user (who it is) and hides the password; a lone token
    # (https://TOKEN@host) is all secret.
    return f"{match['scheme']}{user}:{MASK}@" if sep else f"{match['scheme']}{MASK}@"


def redact_text(text: str) -> str:
    """`text` with the credentials of every URI in it replaced by `***`."""
    if "://" not in text and "=" not in text:
        return text
    text = _USERINFO.sub(_mask_userinfo, text)
    return _SECRET_PARAM.sub(lambda m: f"{m['key']}{MASK}", text)


def redact_uri(uri: str | None) -> str | None:
    """A URI fit to print: `http://user:pass@host` -> `http://user:***@host` (None stays None)."""
    return None if uri is None else redact_text(str(uri))


class RedactingFilter(logging.Filter):
    """Rewrites a record's message (and traceback text) with `redact_text`; never drops one."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact_text(message)
        if clean != message:
            record.msg, record.args = clean, ()
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact_text(record.exc_text)
        return True


def redact_logs(*loggers: logging.Logger) -> RedactingFilter:
    """Put one RedactingFilter on every handler of the root logger and of `loggers`
    (a filter on a handler sees the records of all loggers that reach it). Idempotent."""
    found = next(
        (f for h in logging.getLogger().handlers for f in h.filters if isinstance(f, RedactingFilter)),
        None,
    )
    redacting = found or RedactingFilter()
    for logger in (logging.getLogger(), *loggers):
        for handler in logger.handlers:
            if not any(isinstance(f, RedactingFilter) for f in handler.filters):
                handler.addFilter(redacting)
    return redacting
