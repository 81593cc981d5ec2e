// dictd.hpp — reading a dictd dictionary (the format of Debian's dict-* packages: FreeDict's
// bilingual dictionaries, GCIDE, WordNet) and the (word -> first translation) pairs of a
// bilingual one. Shared by the real-data examples, not part of pkm.
//
// A dictd dictionary is two files:
//   NAME.index     one line per entry: headword TAB offset TAB length [TAB ...], the numbers
//                  in dictd's base 64 (digits A-Z a-z 0-9 + /, most significant first)
//   NAME.dict.dz   the entries' text, gzip-compressed (dictzip: gzip with a chunk table in an
//                  extra field, readable as plain gzip), or NAME.dict uncompressed
// Every byte from outside is checked: a malformed index line, an entry past the end of the
// text, a truncated or corrupt .dz and text that is not UTF-8 are std::runtime_error naming the
// file, the line or entry and what was wrong; nothing is read out of bounds.
#pragma once

#include <zlib.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <limits>
#include <map>
#include <set>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

namespace dictd {

/// One line of the index.
struct Entry {
  std::string headword;
  std::uint64_t offset = 0, length = 0;
};

[[noreturn]] inline void fail(const std::string& what) { throw std::runtime_error(what); }

/// A value from the file, clipped for an error message.
inline std::string clip(std::string_view s) {
  std::string out;
  for (char c : s.substr(0, 40)) out += (static_cast<unsigned char>(c) < 32) ? '?' : c;
  return s.size() > 40 ? out + "..." : out;
}

/// A number in dictd's base 64; throws naming `where` on an empty, bad or overflowing one.
inline std::uint64_t decode_number(std::string_view s, const std::string& where) {
  if (s.empty()) fail(where + ": an empty number");
  std::uint64_t v = 0;
  for (char c : s) {
    int d = -1;
    if (c >= 'A' && c <= 'Z') d = c - 'A';
    else if (c >= 'a' && c <= 'z') d = c - 'a' + 26;
    else if (c >= '0' && c <= '9') d = c - '0' + 52;
    else if (c == '+') d = 62;
    else if (c == '/') d = 63;
    if (d < 0) fail(where + ": '" + clip(s) + "' is not a dictd base-64 number");
    if (v > (std::numeric_limits<std::uint64_t>::max() >> 6))
      fail(where + ": the number '" + clip(s) + "' overflows 64 bits");
    v = v * 64 + std::uint64_t(d);
  }
  return v;
}

/// Decodes UTF-8 into code points; false (and `out` partial) on a malformed sequence, an
/// overlong form, a surrogate or a code point past U+10FFFF.
inline bool decode_utf8(std::string_view s, std::u32string* out = nullptr) {
  std::size_t i = 0;
  while (i < s.size()) {
    const unsigned char c = static_cast<unsigned char>(s[i]);
    char32_t cp = 0;
    std::size_t n = 0;
    if (c < 0x80) cp = c, n = 0;
    else if ((c & 0xE0) == 0xC0) cp = c & 0x1F, n = 1;
    else if ((c & 0xF0) == 0xE0) cp = c & 0x0F, n = 2;
    else if ((c & 0xF8) == 0xF0) cp = c & 0x07, n = 3;
    else return false;
    if (i + n >= s.size() && n > 0) return false;  // the sequence runs past the end
    for (std::size_t k = 1; k <= n; ++k) {
      const unsigned char t = static_cast<unsigned char>(s[i + k]);
      if ((t & 0xC0) != 0x80) return false;
      cp = (cp << 6) | (t & 0x3F);
    }
    static constexpr char32_t kMin[4] = {0, 0x80, 0x800, 0x10000};
    if (cp < kMin[n] || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return false;
    if (out) out->push_back(cp);
    i += n + 1;
  }
  return true;
}

/// The code point as UTF-8.
inline std::string utf8(char32_t cp) {
  std::string s;
  if (cp < 0x80) {
    s += char(cp);
  } else if (cp < 0x800) {
    s += char(0xC0 | (cp >> 6)), s += char(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    s += char(0xE0 | (cp >> 12)), s += char(0x80 | ((cp >> 6) & 0x3F)), s += char(0x80 | (cp & 0x3F));
  } else {
    s += char(0xF0 | (cp >> 18)), s += char(0x80 | ((cp >> 12) & 0x3F)),
        s += char(0x80 | ((cp >> 6) & 0x3F)), s += char(0x80 | (cp & 0x3F));
  }
  return s;
}
inline std::string utf8(const std::u32string& s) {
  std::string out;
  for (char32_t c : s) out += utf8(c);
  return out;
}

/// The index file's entries, in file order.
inline std::vector<Entry> read_index(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) fail(path + ": cannot open the index");
  std::vector<Entry> entries;
  std::string line;
  std::uint64_t number = 0;
  while (std::getline(in, line)) {
    ++number;
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (line.empty()) continue;
    const std::string where = path + " line " + std::to_string(number);
    const std::size_t t1 = line.find('\t');
    const std::size_t t2 = t1 == std::string::npos ? t1 : line.find('\t', t1 + 1);
    if (t2 == std::string::npos)
      fail(where + ": expected headword TAB offset TAB length, got '" + clip(line) + "'");
    const std::size_t t3 = line.find('\t', t2 + 1);
    Entry e;
    e.headword = line.substr(0, t1);
    if (!decode_utf8(e.headword)) fail(where + ": the headword is not UTF-8");
    e.offset = decode_number(std::string_view(line).substr(t1 + 1, t2 - t1 - 1), where);
    e.length = decode_number(
        std::string_view(line).substr(t2 + 1, t3 == std::string::npos ? t3 : t3 - t2 - 1), where);
    entries.push_back(std::move(e));
  }
  if (in.bad()) fail(path + ": read error");
  return entries;
}

/// The text of NAME.dict.dz (gzip) or NAME.dict; at most `max_bytes` of it (a guard against a
/// decompression bomb), else an error.
inline std::string read_text(const std::string& path, std::uint64_t max_bytes = 1ull << 32) {
  const bool gz = path.size() > 3 && path.compare(path.size() - 3, 3, ".dz") == 0;
  std::ifstream in(path, std::ios::binary);
  if (!in) fail(path + ": cannot open the dictionary text");
  std::string raw((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (!gz) return raw;
  z_stream z{};
  if (inflateInit2(&z, 16 + MAX_WBITS) != Z_OK) fail(path + ": zlib could not start");
  std::string out;
  std::vector<unsigned char> buf(1 << 16);
  z.next_in = reinterpret_cast<Bytef*>(raw.data());
  z.avail_in = static_cast<uInt>(std::min<std::size_t>(raw.size(), std::numeric_limits<uInt>::max()));
  std::size_t fed = z.avail_in;
  int rc = Z_OK;
  while (rc != Z_STREAM_END) {
    z.next_out = buf.data();
    z.avail_out = static_cast<uInt>(buf.size());
    rc = inflate(&z, Z_NO_FLUSH);
    if (rc != Z_OK && rc != Z_STREAM_END && !(rc == Z_BUF_ERROR && z.avail_in > 0)) {
      const std::string msg = z.msg ? z.msg : "no more input";
      inflateEnd(&z);
      fail(path + ": not a valid gzip/dictzip stream (" + msg + ") after " +
           std::to_string(out.size()) + " bytes of text: truncated or corrupt");
    }
    out.append(reinterpret_cast<const char*>(buf.data()), buf.size() - z.avail_out);
    if (out.size() > max_bytes) {
      inflateEnd(&z);
      fail(path + ": the text is over " + std::to_string(max_bytes) + " bytes");
    }
    if (z.avail_in == 0 && fed < raw.size()) {
      const std::size_t more = std::min<std::size_t>(raw.size() - fed, std::numeric_limits<uInt>::max());
      z.next_in = reinterpret_cast<Bytef*>(raw.data() + fed);
      z.avail_in = static_cast<uInt>(more);
      fed += more;
    }
    if (rc != Z_STREAM_END && z.avail_in == 0 && fed == raw.size() && z.avail_out != 0) {
      inflateEnd(&z);
      fail(path + ": the gzip stream ends early, after " + std::to_string(out.size()) +
           " bytes of text: truncated");
    }
  }
  inflateEnd(&z);
  return out;
}

/// A dictionary: its index and its text.
struct Dictionary {
  std::string name;
  std::vector<Entry> index;
  std::string text;

  /// The entry's text; throws if it lies past the end of the text or is not UTF-8.
  std::string_view entry(std::size_t i) const {
    const Entry& e = index[i];
    if (e.offset > text.size() || e.length > text.size() - e.offset) {
      fail(name + ": entry " + std::to_string(i) + " ('" + clip(e.headword) + "') at bytes [" +
           std::to_string(e.offset) + ", +" + std::to_string(e.length) +
           ") lies past the end of the text (" + std::to_string(text.size()) + " bytes)");
    }
    const std::string_view v(text.data() + e.offset, e.length);
    if (!decode_utf8(v))
      fail(name + ": entry " + std::to_string(i) + " ('" + clip(e.headword) + "') is not UTF-8");
    return v;
  }
};

/// Opens a dictionary given as NAME (the path without extension), NAME.index, NAME.dict or
/// NAME.dict.dz.
inline Dictionary open(std::string path) {
  for (const char* ext : {".index", ".dict.dz", ".dict"}) {
    const std::string e(ext);
    if (path.size() > e.size() && path.compare(path.size() - e.size(), e.size(), e) == 0) {
      path.resize(path.size() - e.size());
      break;
    }
  }
  Dictionary d;
  d.name = path;
  d.index = read_index(path + ".index");
  const std::string dz = path + ".dict.dz";
  d.text = read_text(std::ifstream(dz).good() ? dz : path + ".dict");
  return d;
}

/// A (source word -> translation) pair, as code points.
struct Pair {
  std::u32string source, target;
};

/// The first translation of an entry: its first line after the headword line, without a
/// leading sense number ("1. "), with <...>, [...], {...} and (...) removed, cut at the first
/// ',' or ';', trimmed. Empty if there is none.
inline std::string first_translation(std::string_view entry) {
  std::size_t at = entry.find('\n');
  while (at != std::string_view::npos) {
    const std::size_t end = entry.find('\n', at + 1);
    std::string_view line = entry.substr(at + 1, end == std::string_view::npos ? end : end - at - 1);
    at = end;
    std::string out;
    int depth = 0;
    for (char c : line) {
      if (c == '<' || c == '[' || c == '{' || c == '(') ++depth;
      else if (c == '>' || c == ']' || c == '}' || c == ')') depth = std::max(0, depth - 1);
      else if (depth == 0) {
        if (c == ',' || c == ';') break;
        out += c;
      }
    }
    std::size_t b = out.find_first_not_of(" \t"), e = out.find_last_not_of(" \t");
    if (b == std::string::npos) continue;
    out = out.substr(b, e - b + 1);
    // A sense number "1. " or "1) " in front.
    std::size_t k = 0;
    while (k < out.size() && out[k] >= '0' && out[k] <= '9') ++k;
    if (k > 0 && k + 1 < out.size() && (out[k] == '.' || out[k] == ')') && out[k + 1] == ' ')
      out = out.substr(k + 2);
    if (!out.empty()) return out;
  }
  return {};
}

/// Whether every code point is a letter-like character of a word: not ASCII punctuation,
/// digits or controls, except '-', '\'' and a space.
inline bool wordlike(const std::u32string& s) {
  for (char32_t c : s) {
    if (c < 0x80) {
      const bool letter = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z');
      if (!letter && c != '-' && c != '\'' && c != ' ') return false;
    } else if (c < 0xC0 || c == 0xD7 || c == 0xF7) {
      return false;  // Latin-1 punctuation and symbols
    }
  }
  return true;
}

/// One pair per distinct headword (its first entry in the index): the headword and its first
/// translation, both 1..max_len code points of word characters (wordlike), source != target.
/// `skipped` (if given) counts the headwords left out.
inline std::vector<Pair> build_pairs(const Dictionary& d, std::size_t max_len,
                                     std::size_t* skipped = nullptr) {
  std::vector<Pair> pairs;
  std::set<std::string> seen;
  std::size_t left_out = 0;
  for (std::size_t i = 0; i < d.index.size(); ++i) {
    std::string head = d.index[i].headword;
    const std::size_t b = head.find_first_not_of(' '), e = head.find_last_not_of(' ');
    head = b == std::string::npos ? std::string() : head.substr(b, e - b + 1);
    if (head.empty() || head.rfind("00-database", 0) == 0 || head.rfind("00database", 0) == 0)
      continue;  // dictd's own information entries
    if (!seen.insert(head).second) continue;
    const std::string_view text = d.entry(i);
    Pair p;
    if (!decode_utf8(head, &p.source) || !decode_utf8(first_translation(text), &p.target) ||
        p.source.empty() || p.target.empty() || p.source.size() > max_len ||
        p.target.size() > max_len || !wordlike(p.source) || !wordlike(p.target) ||
        p.source == p.target) {
      ++left_out;
      continue;
    }
    pairs.push_back(std::move(p));
  }
  if (skipped) *skipped = left_out;
  return pairs;
}

}  // namespace dictd
