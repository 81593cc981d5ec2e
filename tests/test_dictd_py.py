#!/usr/bin/env python3
"""examples/dictd.py (the Python dictd reader of gcide_lm.py) on the hand-made dictionary and on
hostile variants of it, as tests/test_dictd.cpp checks examples/dictd.hpp. Run by CTest:
    python3 tests/test_dictd_py.py
"""
import os
import sys
import tempfile
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "examples"))
import dictd  # noqa: E402

TINY = os.path.join(HERE, "data", "dict", "tiny-eng-deu")


class DictdTest(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.TemporaryDirectory()
        self.index = open(TINY + ".index", "rb").read()
        self.dz = open(TINY + ".dict.dz", "rb").read()

    def tearDown(self):
        self.dir.cleanup()

    def variant(self, index=None, dz=None):
        base = os.path.join(self.dir.name, "v")
        open(base + ".index", "wb").write(self.index if index is None else index)
        open(base + ".dict.dz", "wb").write(self.dz if dz is None else dz)
        return base

    def test_numbers(self):
        self.assertEqual(dictd.decode_number("A", "t"), 0)
        self.assertEqual(dictd.decode_number("BA", "t"), 64)
        self.assertEqual(dictd.decode_number("P//////////", "t"), 2 ** 64 - 1)
        for bad, why in (("", "empty"), ("AB-C", "not a dictd base-64"), ("Q//////////", "overflows")):
            with self.assertRaisesRegex(ValueError, why):
                dictd.decode_number(bad, "x.index line 3")

    def test_tiny(self):
        d = dictd.Dictionary(TINY)
        self.assertEqual(len(d.index), 40)
        self.assertEqual(d.index[1][0], "house")
        self.assertEqual(d.entry_text(1), "house /ipa/\nHaus <neut>\n")
        self.assertEqual(dictd.Dictionary(TINY + ".dict.dz").text, d.text)

    def test_truncated_or_not_gzip(self):
        for keep in (len(self.dz) - 9, len(self.dz) // 2, 12):
            with self.assertRaisesRegex(ValueError, "truncated"):
                dictd.Dictionary(self.variant(dz=self.dz[:keep]))
        with self.assertRaisesRegex(ValueError, "not a valid gzip/dictzip stream"):
            dictd.Dictionary(self.variant(dz=b"this is not compressed at all"))

    def test_entry_past_the_end(self):
        for line in (b"zebra\tBAAA\tB\n", b"zebra\tB\tP//////////\n"):
            d = dictd.Dictionary(self.variant(index=self.index + line))
            with self.assertRaisesRegex(ValueError, r"entry 40 \('zebra'\).*past the end of the text"):
                d.entry(40)

    def test_malformed_lines(self):
        for line in (b"no tabs here\n", b"one\tB\n", b"bad\tB*\tC\n", b"bad\t\tC\n", b"caf\xe9\tB\tC\n"):
            with self.assertRaisesRegex(ValueError, r"\.index line 41"):
                dictd.Dictionary(self.variant(index=self.index + line))

    def test_entry_not_utf8(self):
        text = dictd.Dictionary(TINY).text
        entry = b"caf\xe9 /k/\nKaffee\n"
        digits = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"

        def b64(v):
            s = ""
            while v:
                s, v = digits[v % 64] + s, v // 64
            return s

        line = ("cafe\t%s\t%s\n" % (b64(len(text)), b64(len(entry)))).encode()
        d = dictd.Dictionary(self.variant(index=self.index + line, dz=dictd.compress(text + entry)))
        self.assertEqual(d.entry(40), entry)  # bytes, as the byte-level model reads them
        with self.assertRaisesRegex(ValueError, r"entry 40 \('cafe'\) is not UTF-8"):
            d.entry_text(40)

    def test_missing(self):
        with self.assertRaisesRegex(ValueError, "cannot open the index"):
            dictd.Dictionary(os.path.join(self.dir.name, "no_such"))


if __name__ == "__main__":
    unittest.main()
