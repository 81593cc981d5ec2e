"""Reading a dictd dictionary from Python (the format examples/dictd.hpp reads in C++; the same
checks): NAME.index lines "headword TAB offset TAB length" in dictd's base 64, NAME.dict.dz
gzip (dictzip) text or NAME.dict. A malformed index line, an entry past the end of the text and
a truncated or corrupt .dz raise ValueError naming the file and the line or entry. Entries are
bytes: the byte-level language model (gcide_lm.py) reads them as they are, and
entry_text() decodes one as UTF-8, raising ValueError naming the entry if it is not.
"""
import gzip
import zlib

_DIGITS = {c: i for i, c in enumerate("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")}


def decode_number(text, where):
    """A number in dictd's base 64; ValueError naming `where` on an empty, bad or > 64-bit one."""
    if not text:
        raise ValueError("%s: an empty number" % where)
    value = 0
    for c in text:
        if c not in _DIGITS:
            raise ValueError("%s: %r is not a dictd base-64 number" % (where, text[:40]))
        value = value * 64 + _DIGITS[c]
        if value >= 1 << 64:
            raise ValueError("%s: the number %r overflows 64 bits" % (where, text[:40]))
    return value


class Dictionary:
    """index: [(headword, offset, length)] in file order; text: the whole text, as bytes."""

    def __init__(self, path, max_bytes=1 << 32):
        for ext in (".index", ".dict.dz", ".dict"):
            if path.endswith(ext) and len(path) > len(ext):
                path = path[: -len(ext)]
                break
        self.name = path
        self.index = []
        try:
            raw_index = open(path + ".index", "rb").read()
        except OSError as e:
            raise ValueError("%s.index: cannot open the index (%s)" % (path, e.strerror)) from None
        for number, line in enumerate(raw_index.split(b"\n"), 1):
            line = line.rstrip(b"\r")
            if not line:
                continue
            where = "%s.index line %d" % (path, number)
            parts = line.split(b"\t")
            if len(parts) < 3:
                raise ValueError("%s: expected headword TAB offset TAB length, got %r" % (where, line[:40]))
            try:
                head = parts[0].decode("utf-8")
                numbers = parts[1].decode("ascii"), parts[2].decode("ascii")
            except UnicodeDecodeError:
                raise ValueError("%s: the headword is not UTF-8, or a number is not ASCII" % where) from None
            self.index.append((head, decode_number(numbers[0], where), decode_number(numbers[1], where)))
        try:
            dz = open(path + ".dict.dz", "rb").read()
            self.text = _gunzip(dz, path + ".dict.dz", max_bytes)
        except FileNotFoundError:
            try:
                self.text = open(path + ".dict", "rb").read()
            except OSError as e:
                raise ValueError("%s: no .dict.dz or .dict text (%s)" % (path, e.strerror)) from None

    def entry(self, i):
        """Entry i's bytes; ValueError if it lies past the end of the text."""
        head, offset, length = self.index[i]
        if offset > len(self.text) or length > len(self.text) - offset:
            raise ValueError("%s: entry %d (%r) at bytes [%d, +%d) lies past the end of the text (%d bytes)" %
                             (self.name, i, head[:40], offset, length, len(self.text)))
        return self.text[offset:offset + length]

    def entry_text(self, i):
        """Entry i decoded as UTF-8; ValueError naming it if it is not UTF-8."""
        try:
            return self.entry(i).decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError("%s: entry %d (%r) is not UTF-8" % (self.name, i, self.index[i][0][:40])) from None


def _gunzip(data, name, max_bytes):
    d = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        out = d.decompress(data, max_bytes + 1)
    except zlib.error as e:
        raise ValueError("%s: not a valid gzip/dictzip stream (%s): truncated or corrupt" % (name, e)) from None
    if len(out) > max_bytes:
        raise ValueError("%s: the text is over %d bytes" % (name, max_bytes))
    if not d.eof:
        raise ValueError("%s: the gzip stream ends early, after %d bytes of text: truncated" % (name, len(out)))
    return out


def compress(text):
    """gzip bytes of `text` (for tests that write a dictionary)."""
    return gzip.compress(text, mtime=0)
