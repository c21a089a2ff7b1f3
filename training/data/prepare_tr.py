"""Turkish training text from Debian's `libreoffice-help-tr` package.

Pipeline: get the .deb (`apt-get download`, or `--deb PATH` to run offline) -> unpack it without root
(`dpkg-deb -x`, else a pure-Python ar + tar reader) -> visible text of the HTML help pages, one line
per paragraph, heading or table cell -> keep the Turkish lines -> NFC and whitespace normalization ->
exact, order-preserving dedup -> split by a hash of each line -> `train.txt`, `heldout.txt` and
`stats.json`, written atomically into `--out`.

    python -m diffutron_engine.training.data.prepare_tr --out training/data/tr
    python training/data/prepare_tr.py --deb libreoffice-help-tr_7.4.7_all.deb --out training/data/tr
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import unicodedata
from html.parser import HTMLParser
from pathlib import Path

PACKAGE = "libreoffice-help-tr"
LANG = "tr"
# Where `apt-get download` leaves the .deb, so it can be reused with --deb.
DEFAULT_WORK_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "diffutron-engine" / "prepare_tr"

# ---------------------------------------------------------------------------------------------------
# Getting and unpacking the package
# ---------------------------------------------------------------------------------------------------


def download_deb(package: str, work_dir: Path) -> Path:
    """`apt-get download` the package into work_dir (no root needed) and return the .deb's path."""
    work_dir.mkdir(parents=True, exist_ok=True)
    if shutil.which("apt-get") is None:
        raise RuntimeError("apt-get is not available on this machine")
    before = set(work_dir.glob("*.deb"))
    proc = subprocess.run(["apt-get", "download", package], cwd=work_dir, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"`apt-get download {package}` failed:\n{proc.stderr.strip()}")
    # apt names the file <name>_<epoch%3a version>_<arch>.deb; take the one it just wrote (or, when the
    # same version was already there and got overwritten, the newest one of this package).
    debs = sorted(set(work_dir.glob(f"{package}_*.deb")) - before) or sorted(
        work_dir.glob(f"{package}_*.deb"), key=lambda p: p.stat().st_mtime
    )
    if not debs:
        raise RuntimeError(f"`apt-get download {package}` succeeded but wrote no .deb into {work_dir}")
    return debs[-1]


def ar_members(deb: Path) -> dict[str, bytes]:
    """Members of a .deb (a BSD/GNU `ar` archive): debian-binary, control.tar.*, data.tar.*."""
    raw = deb.read_bytes()
    if not raw.startswith(b"!<arch>\n"):
        raise ValueError(f"{deb} is not an ar archive (.deb)")
    members, pos = {}, 8
    while pos + 60 <= len(raw):
        header = raw[pos : pos + 60]  # name 16, mtime 12, uid 6, gid 6, mode 8, size 10, magic 2
        name = header[:16].decode("ascii").strip().rstrip("/")
        size = int(header[48:58].decode("ascii").strip())
        members[name] = raw[pos + 60 : pos + 60 + size]
        pos += 60 + size + (size % 2)  # members are padded to an even offset
    return members


def _open_member_tar(members: dict[str, bytes], stem: str) -> tarfile.TarFile:
    name = next((n for n in members if n == stem or n.startswith(stem + ".")), None)
    if name is None:
        raise ValueError(f"the .deb has no {stem}.* member (members: {sorted(members)})")
    if name.endswith(".zst") and sys.version_info < (3, 14):  # Ubuntu's .debs; tarfile reads zstd from 3.14
        raise ValueError(f"{name} is zstd-compressed; unpacking it needs dpkg-deb or Python >= 3.14")
    return tarfile.open(fileobj=io.BytesIO(members[name]), mode="r:*")


def parse_control(text: str) -> dict[str, str]:
    """RFC-822-style control fields; continuation lines are appended to the previous field."""
    fields, key = {}, None
    for line in text.splitlines():
        if line[:1] in (" ", "\t") and key:
            fields[key] += "\n" + line.strip()
        elif ":" in line:
            key, value = line.split(":", 1)
            fields[key] = value.strip()
    return fields


def deb_control(deb: Path) -> dict[str, str]:
    """The package's control fields (Package, Version, ...): dpkg-deb when present, else Python."""
    if shutil.which("dpkg-deb"):
        proc = subprocess.run(["dpkg-deb", "--field", str(deb)], capture_output=True, text=True, check=True)
        return parse_control(proc.stdout)
    with _open_member_tar(ar_members(deb), "control.tar") as tar:
        member = next((m for m in tar.getmembers() if m.name.lstrip("./") == "control"), None)
        if member is None:
            raise ValueError(f"{deb} has no control file")
        return parse_control(tar.extractfile(member).read().decode("utf-8"))


def extract_deb(deb: Path, dest: Path) -> None:
    """Unpack the package's files into dest, without root: dpkg-deb when present, else Python."""
    dest.mkdir(parents=True, exist_ok=True)
    if shutil.which("dpkg-deb"):
        subprocess.run(["dpkg-deb", "-x", str(deb), str(dest)], check=True)
        return
    with _open_member_tar(ar_members(deb), "data.tar") as tar:
        if hasattr(tarfile, "data_filter"):  # refuses absolute paths, '..' and device files
            tar.extractall(dest, filter="data")
        else:
            tar.extractall(dest)


# ---------------------------------------------------------------------------------------------------
# Help pages -> text lines
# ---------------------------------------------------------------------------------------------------

# Since LibreOffice 6 the help ships as HTML rendered from the .xhp sources. Every page repeats the
# same header, side bars and a "debug info" footer; the page's own content is <div id="DisplayArea">.
_BLOCK = {"p", "div", "br", "h1", "h2", "h3", "h4", "h5", "h6", "li", "dt", "dd", "td", "th", "tr",
          "table", "ul", "ol", "caption", "pre", "section", "header", "footer", "nav", "aside"}
# Not visible prose: scripts, and <pre> blocks, which hold Basic/Python/Logo code listings.
_SKIP = {"script", "style", "noscript", "pre", "button", "template"}
_VOID = {"br", "img", "input", "meta", "link", "hr", "wbr", "area", "base", "col", "embed", "source"}


class _HelpTextParser(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.lines: list[str] = []
        self._parts: list[str] = []
        self._stack: list[tuple[str, bool, bool]] = []  # (tag, inside the content area, skipped)

    def _flush(self):
        text = "".join(self._parts)
        self._parts = []
        if text.strip():
            self.lines.append(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag in _BLOCK:
            self._flush()
        if tag in _VOID:
            return
        in_area, skipped = self._stack[-1][1:] if self._stack else (False, False)
        in_area = in_area or attrs.get("id") == "DisplayArea"
        # Platform variants (the macOS menu names) sit in hidden="true" spans beside the default one.
        skipped = skipped or tag in _SKIP or "hidden" in attrs
        self._stack.append((tag, in_area, skipped))

    def handle_endtag(self, tag):
        if tag in _BLOCK:
            self._flush()
        # Tolerate unclosed elements: pop up to the matching open tag, if there is one.
        for i in range(len(self._stack) - 1, -1, -1):
            if self._stack[i][0] == tag:
                del self._stack[i:]
                break

    def handle_data(self, data):
        if self._stack and self._stack[-1][1] and not self._stack[-1][2]:
            self._parts.append(data)

    def close(self):
        super().close()
        self._flush()


def page_lines(html: str) -> list[str]:
    """Visible text of one help page's content area, one raw line per block element."""
    parser = _HelpTextParser()
    parser.feed(html)
    parser.close()
    return parser.lines


def help_pages(root: Path, lang: str = LANG) -> list[Path]:
    """The HTML help pages of an unpacked package, in a stable (sorted) order."""
    base = root / "usr" / "share" / "libreoffice" / "help" / lang
    return sorted(base.rglob("*.html"))


# ---------------------------------------------------------------------------------------------------
# Normalization and the Turkish filter
# ---------------------------------------------------------------------------------------------------

_INVISIBLE = dict.fromkeys(map(ord, "\u00ad\u200b\u200c\u200d\u2060\ufeff"))  # soft hyphen, zero-widths


def normalize(line: str) -> str:
    """NFC, invisible characters dropped, any run of whitespace (NBSP included) made one space."""
    return " ".join(unicodedata.normalize("NFC", line).translate(_INVISIBLE).split())


_WORD = re.compile(r"[^\W\d_]+")  # runs of letters, any script
TURKISH_LETTERS = set("çğıöşüÇĞİÖŞÜ")
# Frequent Turkish words written without any of the letters above, so that a short sentence such as
# "Bu bir tablo ve bir grafik" is still recognised.
TURKISH_WORDS = set("""ve veya ya da de bir bu o ile ise ki ne ama fakat ancak en her daha kadar gibi
    sonra olarak olan olur var yok tek tam hem yani diye yeni hangi bunu buna bunlar onu ona
    tablo sayfa metin belge hesap nesne alan""".split())
# Turkish is agglutinative: plural, case, copula and verb suffixes mark words that have none of the
# letters above ("getirisidir", "notlara", "eklemek"). Only endings that English words rarely have
# are listed ("-den", "-ine" would match "hidden", "line").
TURKISH_SUFFIXES = ("lar", "ler", "lara", "lere", "dir", "tir", "dur", "tur", "mak", "mek", "arak",
                    "erek", "iniz", "sini", "nin", "yor", "abilir", "ebilir", "leri")
# English function words. The Turkish help is partly untranslated (whole English paragraphs). Words
# that are also Turkish ("on" ten, "at" horse, "can" soul, "an" moment, "as", "it") and key or
# keyword names that Turkish text quotes ("Enter", "Open") are left out on purpose.
ENGLISH_WORDS = set("""the and of to in is are was be been for from with by or not this that these
    those which what when where you your will would cannot should may must has have had into only
    also such there their its all any each other more most use used using select choose click
    displays specifies see following example""".split())
# Tokens that are code, not prose: formulas (=SUM(A1:B2)), calls (f(x)), paths and URLs, dotted API
# names (com.sun.star.x), identifiers with underscores, markup and placeholders (<?>).
_CODE_TOKEN = re.compile(r"[=\\{}<>|$#@_]|\w\(|://|\w/\w+/|\w\.\w+\.\w")


def turkish_lower(word: str) -> str:
    """Lower-case the Turkish way: I -> ı and İ -> i (str.lower() gives 'i̇' for 'İ')."""
    return word.replace("I", "ı").replace("İ", "i").lower()


def is_turkish_word(word: str) -> bool:
    lower = turkish_lower(word)
    return bool(TURKISH_LETTERS.intersection(word)) or lower in TURKISH_WORDS or lower.endswith(TURKISH_SUFFIXES)


def reject_reason(line: str, min_letters: int = 12, min_words: int = 3) -> str | None:
    """Why a normalized line is not kept as Turkish prose, or None to keep it.

    The rules, cheapest first:
    - short: fewer than `min_words` words or `min_letters` letters; menu labels and single terms
      ("Tamam", "Biçim - Hücreler") teach a small model little and repeat endlessly;
    - code: more than 20% of the space-separated tokens look like code (formula listings, API
      names, MIME types, paths); prose quoting one formula is kept;
    - symbols: fewer than 70% of the non-space characters are letters (tables of values, codes);
    - english: English function words are at least 10% of the words and at least half as many as
      the Turkish-looking words (untranslated strings; "If...Then" quoted in Turkish prose stays);
    - not_turkish: fewer than 20% of the words look Turkish (a Turkish-only letter çğıöşü..., a
      frequent Turkish word, a Turkish suffix). Inflection puts such marks in nearly every Turkish
      sentence, while English/product-name lines that slipped past the English rule have none.
    """
    words = _WORD.findall(line)
    letters = sum(len(w) for w in words)
    if len(words) < min_words or letters < min_letters:
        return "short"
    tokens = line.split()
    if sum(bool(_CODE_TOKEN.search(t)) for t in tokens) > 0.2 * len(tokens):
        return "code"
    if letters < 0.7 * len(line.replace(" ", "")):
        return "symbols"
    turkish = sum(map(is_turkish_word, words))
    english = sum(turkish_lower(w) in ENGLISH_WORDS for w in words)
    if english >= 0.1 * len(words) and 2 * english >= turkish:
        return "english"
    if turkish < 0.2 * len(words):
        return "not_turkish"
    return None


def dedup(lines):
    """Exact duplicates removed, first occurrence kept (dicts keep insertion order)."""
    return list(dict.fromkeys(lines))


# ---------------------------------------------------------------------------------------------------
# Split, stats, output
# ---------------------------------------------------------------------------------------------------


def is_heldout(line: str, fraction: float) -> bool:
    """A line's split depends on its text only: stable across runs, machines and package updates
    (a line present in two package versions lands in the same split), unlike a shuffled cut."""
    h = int.from_bytes(hashlib.sha256(line.encode("utf-8")).digest()[:8], "big")
    return h < fraction * 2**64


def split(lines: list[str], fraction: float) -> tuple[list[str], list[str]]:
    train, heldout = [], []
    for line in lines:
        (heldout if is_heldout(line, fraction) else train).append(line)
    return train, heldout


def text_stats(lines: list[str]) -> dict[str, int]:
    return {"lines": len(lines), "chars": sum(map(len, lines)), "words": sum(len(x.split()) for x in lines)}


def write_atomic(out_dir: Path, files: dict[str, str]) -> None:
    """Write every file to a temporary name in out_dir first, then rename them all into place, so a
    crash never leaves a half-written file under a final name."""
    out_dir.mkdir(parents=True, exist_ok=True)
    temps = {}
    try:
        for name, text in files.items():
            fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=out_dir)
            temps[name] = tmp
            with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)  # mkstemp creates 0600; these are ordinary data files
        for name, tmp in temps.items():
            os.replace(tmp, out_dir / name)
    finally:
        for tmp in temps.values():
            if os.path.exists(tmp):
                os.unlink(tmp)


def _lines_file(lines: list[str]) -> str:
    return "".join(line + "\n" for line in lines)


def prepare(deb: Path, out_dir: Path, heldout_fraction: float, min_letters: int, min_words: int) -> dict:
    """The whole pipeline on one .deb; returns the stats also written to out_dir/stats.json."""
    control = deb_control(deb)
    with tempfile.TemporaryDirectory(prefix="prepare_tr.") as tmp:
        root = Path(tmp)
        extract_deb(deb, root)
        pages = help_pages(root)
        if not pages:
            raise RuntimeError(f"no HTML help pages under usr/share/libreoffice/help/{LANG}/ in {deb}")
        raw = [line for page in pages for line in page_lines(page.read_text(encoding="utf-8", errors="replace"))]
    normalized = [n for n in map(normalize, raw) if n]
    rejected: dict[str, int] = {}
    kept = []
    for line in normalized:
        reason = reject_reason(line, min_letters=min_letters, min_words=min_words)
        if reason is None:
            kept.append(line)
        else:
            rejected[reason] = rejected.get(reason, 0) + 1
    unique = dedup(kept)
    train, heldout = split(unique, heldout_fraction)
    stats = {
        "source": {
            "package": control.get("Package", PACKAGE),
            "version": control.get("Version"),
            "deb_file": deb.name,
            "deb_sha256": hashlib.sha256(deb.read_bytes()).hexdigest(),
            "html_pages": len(pages),
        },
        "settings": {"heldout_fraction": heldout_fraction, "min_letters": min_letters, "min_words": min_words},
        "extracted": text_stats(normalized),
        "rejected": dict(sorted(rejected.items())),
        "after_filter": text_stats(kept),
        "after_dedup": text_stats(unique),
        "train": text_stats(train),
        "heldout": text_stats(heldout),
    }
    write_atomic(
        out_dir,
        {
            "train.txt": _lines_file(train),
            "heldout.txt": _lines_file(heldout),
            "stats.json": json.dumps(stats, ensure_ascii=False, indent=2) + "\n",
        },
    )
    return stats


def _fraction(value: str) -> float:
    f = float(value)
    if not 0.0 <= f < 1.0:
        raise argparse.ArgumentTypeError("must be in [0, 1)")
    return f


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="prepare_tr",
        description=f"Build Turkish train/held-out text from Debian's {PACKAGE} package (LibreOffice help, "
        "MPL-2.0): extract the help pages' text, keep Turkish lines, dedup, split by line hash.",
        epilog="example: python -m diffutron_engine.training.data.prepare_tr --out training/data/tr",
    )
    add = parser.add_argument
    add("--out", type=Path, required=True, metavar="DIR", help="output directory for train.txt, heldout.txt, stats.json")
    add("--deb", type=Path, metavar="PATH", help=f"use this {PACKAGE} .deb instead of downloading it (offline runs)")
    add("--work-dir", type=Path, default=DEFAULT_WORK_DIR, metavar="DIR",
        help="where `apt-get download` puts the .deb, kept for reuse with --deb (default: %(default)s)")
    add("--heldout-fraction", type=_fraction, default=0.02, metavar="F",
        help="share of the unique lines held out, chosen by a hash of each line (default: %(default)s)")
    add("--min-letters", type=int, default=12, metavar="N", help="drop lines with fewer letters (default: %(default)s)")
    add("--min-words", type=int, default=3, metavar="N", help="drop lines with fewer words (default: %(default)s)")
    args = parser.parse_args(argv)

    deb = args.deb
    if deb is None:
        try:
            deb = download_deb(PACKAGE, args.work_dir)
        except (RuntimeError, OSError) as exc:
            print(f"error: could not download {PACKAGE}: {exc}\n"
                  f"Pass a local copy with --deb PATH (e.g. from `apt-get download {PACKAGE}` elsewhere).",
                  file=sys.stderr)
            return 2
        print(f"downloaded {deb}", file=sys.stderr)
    elif not deb.is_file():
        print(f"error: --deb {deb}: no such file", file=sys.stderr)
        return 2

    try:
        stats = prepare(deb, args.out, args.heldout_fraction, args.min_letters, args.min_words)
    except (RuntimeError, ValueError, OSError, tarfile.TarError, subprocess.CalledProcessError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    src = stats["source"]
    print(f"{src['package']} {src['version']}: {src['html_pages']} pages, {stats['extracted']['lines']} lines "
          f"-> {stats['after_filter']['lines']} Turkish -> {stats['after_dedup']['lines']} unique; "
          f"train {stats['train']['lines']} lines / {stats['train']['chars']} chars, "
          f"held-out {stats['heldout']['lines']} lines -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
