"""Reading the UTF-8 text files a corpus preparation takes as input (Kaldi tables, transcripts, text to encode).

A file that is not UTF-8 (e.g. Latin-1) is one :class:`CorpusError` naming the line and byte offset of
the first bad byte instead of a bare ``UnicodeDecodeError``; a leading UTF-8 byte order mark is dropped
(it would otherwise become part of the first field).
"""
from pathlib import Path
from typing import List

from fairseq_accel.data.errors import CorpusError

UTF8_BOM = b"\xef\xbb\xbf"


def read_utf8_lines(path: Path) -> List[str]:
    """The lines of the UTF-8 text file ``path`` (only ``\\n`` ends a line), without a byte order mark."""
    data = Path(path).read_bytes()
    start = len(UTF8_BOM) if data.startswith(UTF8_BOM) else 0
    try:
        text = data[start:].decode("utf-8")
    except UnicodeDecodeError as err:
        offset = start + err.start
        line = data.count(b"\n", 0, offset) + 1
        raise CorpusError(
            f"{path}, line {line}: not UTF-8 text: byte 0x{data[offset]:02x} at byte offset {offset} "
            f"({err.reason}); expected UTF-8, e.g. convert with `iconv -f latin1 -t utf-8`"
        ) from None
    lines = text.split("\n")
    if lines[-1] == "":  # the newline that ends the last line
        lines.pop()
    return lines
