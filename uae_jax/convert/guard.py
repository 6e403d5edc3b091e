"""Turns what a malformed weight file makes a parser raise into one `ConversionError` line.

A file of random bytes, a truncated download or a valid container holding the wrong things makes
unpicklers, JSON/msgpack readers and key tables fail with `IndexError`, `KeyError`, `TypeError`
and friends deep inside. Every public loader is wrapped with `loader(...)`, so the user sees
`<file>: malformed <what> (<error>: <detail>)` instead of a traceback; errors that are already
`UserError`s (ours, with a better message) pass through unchanged.
"""
import contextlib
import functools
import os
import pickle
import struct
import zipfile

from uae_jax.convert.tables import ConversionError
from uae_jax.errors import UserError

# What parsers raise on bad bytes or a wrong structure (not bugs of ours: those are other types).
DATA_ERRORS = (KeyError, IndexError, TypeError, ValueError, AttributeError, EOFError, OSError,
               struct.error, UnicodeDecodeError, OverflowError, MemoryError, RecursionError,
               zipfile.BadZipFile, pickle.UnpicklingError)


def why(e: BaseException) -> str:
  """'Type: first line of the message' of an exception."""
  text = str(e).strip().splitlines()[0] if str(e).strip() else "no detail"
  return f"{type(e).__name__}: {text[:300]}"


@contextlib.contextmanager
def reading(path, what: str = "weights"):
  """Re-raises a parser error inside the block as `ConversionError('<path>: malformed <what>')`."""
  try:
    yield
  except UserError as e:
    name = os.fspath(path)
    if name not in str(e) and os.path.basename(name.rstrip("/")) not in str(e):
      e.args = (f"{name}: {e}",) + tuple(e.args[1:])  # name the file the message forgot
    raise
  except FileNotFoundError as e:
    raise ConversionError(f"{os.fspath(path)}: no such file ({e.filename or e})") from None
  except DATA_ERRORS as e:
    raise ConversionError(f"{os.fspath(path)}: malformed {what} ({why(e)})") from None


def loader(what: str):
  """Decorator for `fn(path, ...)`: parser errors become one-line `ConversionError`s naming path."""

  def wrap(fn):
    """The wrapped loader."""

    @functools.wraps(fn)
    def wrapped(path, *args, **kwargs):
      """Runs the loader under `reading(path, what)`."""
      with reading(path, what):
        return fn(path, *args, **kwargs)

    return wrapped

  return wrap
