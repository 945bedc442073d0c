"""Which text encoding a page's bytes are in: its byte-order mark, what its server declares,
what its HTML ``<meta>`` declares (the order HTML's encoding sniffing gives them).

Only codecs that turn bytes into text count: Python also knows ``hex``, ``base64``, ``rot13``
and the like by name, and ``idna``, ``punycode`` and ``undefined`` cannot read arbitrary bytes
with replacement, so a page naming one of those is read as if it named none.
"""

from __future__ import annotations

import codecs
import re

# A byte-order mark says the encoding whatever a header or <meta> claims (UTF-32 before UTF-16:
# UTF-32 LE's mark begins with UTF-16 LE's).
_BOMS = (
    (codecs.BOM_UTF8, "utf-8"),
    (codecs.BOM_UTF32_LE, "utf-32-le"),
    (codecs.BOM_UTF32_BE, "utf-32-be"),
    (codecs.BOM_UTF16_LE, "utf-16-le"),
    (codecs.BOM_UTF16_BE, "utf-16-be"),
)
META_CHARSET_RE = re.compile(rb"""<meta[^>]+charset\s*=\s*["']?([A-Za-z0-9._:-]+)""", re.I)
META_SNIFF_BYTES = 4096  # where a <meta> charset is looked for
# text codecs that fail on arbitrary bytes even with errors="replace"
_NOT_DECODING = frozenset({"idna", "punycode", "undefined"})


# What browsers read these labels as (the WHATWG Encoding standard), by Python's codec name:
# pages labelled latin-1 or ASCII are windows-1252 in practice (their curly quotes, 0x91-0x94,
# are no C1 controls); a label of a legacy standard means the vendor's superset that wrote it
# (gb2312 and GBK pages decode as gb18030, EUC-KR as windows-949, ISO-8859-9 as windows-1254,
# TIS-620 and ISO-8859-11 as windows-874, Shift_JIS as windows-31J). Big5 stays Python's big5:
# its big5hkscs refuses six pairs big5 reads (C6CF: に).
_AS_BROWSERS_READ = {
    "latin-1": "cp1252", "iso8859-1": "cp1252", "ascii": "cp1252",
    "gb2312": "gb18030", "gbk": "gb18030", "euc_kr": "cp949", "iso8859-9": "cp1254",
    "tis-620": "cp874", "iso8859-11": "cp874", "shift_jis": "cp932",
}
# WHATWG labels Python's codecs do not know (pages in the wild carry them: Thai ones say
# windows-874, old Japanese ones x-sjis), as the Python codec browsers' reading matches (the
# "replacement" labels, ISO-2022-KR/CN and HZ, and UTF-16's unicodefeff/unicodefffe are left out)
_LABELS_PYTHON_LACKS = {
    "windows-874": "cp874", "dos-874": "cp874",
    "x-gbk": "gb18030", "csgb2312": "gb18030", "gb_2312-80": "gb18030", "gb_2312": "gb18030",
    "csiso58gb231280": "gb18030",
    "x-sjis": "cp932", "windows-31j": "cp932",
    "windows-949": "cp949", "cseuckr": "cp949", "csksc56011987": "cp949", "iso-ir-149": "cp949",
    "ks_c_5601-1989": "cp949", "ksc_5601": "cp949",
    "x-euc-jp": "euc_jp", "cseucpkdfmtjapanese": "euc_jp",
    "x-x-big5": "big5", "cn-big5": "big5",
    "iso-8859-8-i": "iso8859-8", "csiso88598i": "iso8859-8", "logical": "iso8859-8",
    "iso-8859-8-e": "iso8859-8", "csiso88598e": "iso8859-8", "visual": "iso8859-8",
    "iso-8859-6-e": "iso8859-6", "iso-8859-6-i": "iso8859-6", "csiso88596e": "iso8859-6",
    "csiso88596i": "iso8859-6", "sun_eu_greek": "iso8859-7", "csisolatin9": "iso8859-15",
    "koi": "koi8-r", "koi8": "koi8-r", "koi8-ru": "koi8-u",
    "x-mac-roman": "mac-roman", "csmacintosh": "mac-roman", "mac": "mac-roman",
    "x-mac-cyrillic": "mac-cyrillic", "x-mac-ukrainian": "mac-cyrillic",
    "unicode-1-1-utf-8": "utf-8", "unicode11utf8": "utf-8", "unicode20utf8": "utf-8",
    "x-unicode20utf8": "utf-8",
    **{f"x-cp125{i}": f"cp125{i}" for i in range(9)},
    **{f"iso8859{n}": f"iso8859-{n}" for n in (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15)},
}
_WIDE = ("utf-16", "utf-32")  # a <meta> naming these is wrong by definition: it is ASCII text


def text_codec(name: str | bytes | None) -> str | None:
    """Python's name for the text encoding called ``name``, as browsers read the label; None
    when it names none."""
    if isinstance(name, bytes):
        name = name.decode("ascii", "replace")
    if not name:
        return None
    name = name.strip()
    try:
        info = codecs.lookup(_LABELS_PYTHON_LACKS.get(name.lower(), name))
    except LookupError:
        return None
    if not getattr(info, "_is_text_encoding", True) or info.name in _NOT_DECODING:
        return None
    return _AS_BROWSERS_READ.get(info.name, info.name)


def _c1_control(error: UnicodeError, undefined: str | None = None) -> tuple[str, int]:
    """A byte 0x80-0x9F that Python's windows code pages leave undefined (cp1252's 0x81, 0x8D,
    0x8F, 0x90, 0x9D; cp1254's 0x8E ...) read as WHATWG's decoders read it: the C1 control of
    the same number (ISO-8859-9 read so, so its windows-1254 reading must too). Another
    undefined byte is ``undefined``, or the error when None."""
    assert isinstance(error, UnicodeDecodeError), error
    byte = error.object[error.start]
    if 0x80 <= byte <= 0x9F:
        return chr(byte), error.start + 1
    if undefined is None:
        raise error
    return undefined, error.start + 1


codecs.register_error("citeqa-c1", _c1_control)
codecs.register_error("citeqa-c1-replace", lambda error: _c1_control(error, "\ufffd"))
_C1_CODECS = frozenset({"cp874", *(f"cp125{i}" for i in range(9))})  # windows code pages


def decode(data: bytes, codec: str, *, errors: str = "strict") -> str:
    """``data`` in ``codec``; a windows code page as browsers decode it (an undefined byte of
    0x80-0x9F made a windows-1252 page Latin-1 or U+FFFD); ``errors`` "strict" or "replace"."""
    if codec in _C1_CODECS:
        return data.decode(codec, errors="citeqa-c1" if errors == "strict" else "citeqa-c1-replace")
    return data.decode(codec, errors=errors)


def bom_codec(data: bytes) -> tuple[str, int] | None:
    """``(codec, length of the mark)`` when ``data`` starts with a byte-order mark."""
    for bom, name in _BOMS:
        if data.startswith(bom):
            return name, len(bom)
    return None


def meta_declared(data: bytes) -> tuple[str, str | None] | None:
    """``(label, codec)`` of the charset an HTML page's ``<meta>`` declares in its first bytes
    (None when none): the codec as browsers read the label (UTF-8 for a UTF-16 or UTF-32
    label: bytes in which a <meta> could be read are not those), None for no text codec."""
    m = META_CHARSET_RE.search(data[:META_SNIFF_BYTES])
    if m is None:
        return None
    label = m.group(1).decode("ascii", "replace")
    codec = text_codec(label)
    return label, "utf-8" if codec is not None and codec.startswith(_WIDE) else codec


def meta_charset(data: bytes) -> str | None:
    """The text codec an HTML page's ``<meta>`` declares, if any (``meta_declared``)."""
    declared = meta_declared(data)
    return declared[1] if declared else None


def decode_page(data: bytes, declared: str | None, *, html: bool) -> str:
    """A fetched page's text: by its byte-order mark (dropped), else the charset its server
    ``declared``, else (``html``) its ``<meta>`` charset, else UTF-8; bytes that do not decode
    become U+FFFD."""
    bom = bom_codec(data)
    if bom is not None:
        return data[bom[1]:].decode(bom[0], errors="replace")
    codec = text_codec(declared) or (meta_charset(data) if html else None) or "utf-8"
    return decode(data, codec, errors="replace")
