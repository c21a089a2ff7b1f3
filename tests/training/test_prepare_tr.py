"""prepare_tr on a tiny synthetic libreoffice-help-tr: a fake .deb holding two help pages in the real
HTML layout (one Turkish, one untranslated English with code). No network, no apt."""

import io
import json
import shutil
import tarfile

import pytest

from diffutron_engine.training.data import prepare_tr as P

HEAD = """<!DOCTYPE html>
<html lang="tr" dir="ltr"><head><meta http-equiv="Content-Type" content="text/html; charset=utf-8">
<title>{title}</title><script type="text/javascript" src="help.js"></script></head>
<body><header id="TopLeftHeader"><a class="logo" href="x.html"><p dir="auto">LibreOffice 7.4 Yardım</p></a></header>
<aside class="leftside"><div class="index-label" dir="auto">Dizin</div></aside>
<div id="DisplayArea" itemprop="softwareHelp">
"""
FOOT = """</div><footer><div id="DEBUG" class="debug"><h3 class="bug">Help content debug info:</h3>
<p dir="auto">Title is: {title}</p></div></footer></body></html>
"""

TURKISH_PAGE = HEAD.format(title="Hücre Biçimlendirme") + """
<h1 id="hd_1" dir="auto">Hücreleri Biçimlendirmek İçin Seçenekler</h1>
<p id="par_1" class="paragraph" dir="auto"><span class="avis">Seçili hücrelerin   biçimini
 ve yazı tipini belirler.</span></p>
<p id="par_2" dir="auto">Seçin <span hidden="true" class="MAC">Tercihler</span><span>Araçlar - Seçenekler</span> ve sonra Tamam düğmesine tıklayın.</p>
<p id="par_3" dir="auto">Seçili hücrelerin biçimini ve yazı tipini belirler.</p>
<pre dir="auto"><code class="language-visual-basic">Sub Main
  MsgBox "Merhaba dünya, bu bir örnek"
End Sub</code></pre>
<table><tr><td><p dir="auto">Tamam</p></td><td><p dir="auto">Bu tablo hücresindeki metin Türkçedir.</p></td></tr></table>
<p dir="auto">=TOPLA(A1:A5;B1:B5) =ORTALAMA(C1:C3)</p>
<p dir="auto">Bu komut LibreOffice&nbsp;7.2 sürümünden itibaren kullanılabilir.</p>
""" + FOOT.format(title="Hücre Biçimlendirme")

ENGLISH_PAGE = HEAD.format(title="Macros") + """
<h1 dir="auto">Running Macros From the Basic IDE</h1>
<p dir="auto">Choose Tools - Macros - Edit Macros to open the Basic IDE and select the module.</p>
<p dir="auto">svc.GetValue(range: str, sheet: str): any[0..*]</p>
<p dir="auto">com.sun.star.sheet.addin.Analysis.getEomonth</p>
""" + FOOT.format(title="Macros")

PAGES = {"text/scalc/01/format_cells.html": TURKISH_PAGE, "text/sbasic/shared/run_macros.html": ENGLISH_PAGE}
EXPECTED = [
    "Hücreleri Biçimlendirmek İçin Seçenekler",
    "Seçili hücrelerin biçimini ve yazı tipini belirler.",
    "Seçin Araçlar - Seçenekler ve sonra Tamam düğmesine tıklayın.",
    "Bu tablo hücresindeki metin Türkçedir.",
    "Bu komut LibreOffice 7.2 sürümünden itibaren kullanılabilir.",
]


def _tar_xz(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:xz") as tar:
        dirs = sorted({"/".join(p.split("/")[:i]) for p in files for i in range(1, p.count("/") + 1)})
        for d in dirs:
            info = tarfile.TarInfo("./" + d)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
        for path, data in files.items():
            info = tarfile.TarInfo("./" + path)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _ar(members: list[tuple[str, bytes]]) -> bytes:
    out = b"!<arch>\n"
    for name, data in members:
        out += f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(data):<10}`\n".encode("ascii")
        out += data + (b"\n" if len(data) % 2 else b"")
    return out


@pytest.fixture(scope="module")
def fake_deb(tmp_path_factory):
    control = b"Package: libreoffice-help-tr\nVersion: 4:1.2.3-1\nArchitecture: all\nDescription: test\n fake\n"
    data = {f"usr/share/libreoffice/help/tr/{p}": html.encode("utf-8") for p, html in PAGES.items()}
    data["usr/share/doc/libreoffice-help-tr/copyright"] = b"License: MPL-2.0\n"
    deb = tmp_path_factory.mktemp("deb") / "libreoffice-help-tr_1.2.3-1_all.deb"
    deb.write_bytes(_ar([("debian-binary", b"2.0\n"), ("control.tar.xz", _tar_xz({"control": control})),
                         ("data.tar.xz", _tar_xz(data))]))
    return deb


def _lines(root):
    raw = [line for page in P.help_pages(root) for line in P.page_lines(page.read_text(encoding="utf-8"))]
    return [n for n in map(P.normalize, raw) if n]


def test_page_lines_keeps_content_area_only():
    lines = [P.normalize(x) for x in P.page_lines(TURKISH_PAGE)]
    assert lines[0] == "Hücreleri Biçimlendirmek İçin Seçenekler"
    assert "Seçin Araçlar - Seçenekler ve sonra Tamam düğmesine tıklayın." in lines  # hidden MAC variant dropped
    assert "Tamam" in lines  # table cells are lines of their own
    joined = "\n".join(lines)
    for absent in ("Yardım", "Dizin", "debug", "Title is", "MsgBox", "Tercihler"):
        assert absent not in joined


@pytest.mark.parametrize("python_only", [False, True])
def test_extract_deb(fake_deb, tmp_path, monkeypatch, python_only):
    if python_only:  # the fallback for machines without dpkg-deb
        real_which = shutil.which
        monkeypatch.setattr(P.shutil, "which", lambda cmd: None if cmd == "dpkg-deb" else real_which(cmd))
    elif shutil.which("dpkg-deb") is None:
        pytest.skip("dpkg-deb not installed")
    assert P.deb_control(fake_deb)["Version"] == "4:1.2.3-1"
    P.extract_deb(fake_deb, tmp_path)
    pages = P.help_pages(tmp_path)
    assert [p.name for p in pages] == ["run_macros.html", "format_cells.html"]  # sorted: sbasic < scalc
    assert (tmp_path / "usr/share/doc/libreoffice-help-tr/copyright").read_text() == "License: MPL-2.0\n"


def test_filter_and_dedup(fake_deb, tmp_path):
    P.extract_deb(fake_deb, tmp_path)
    kept = P.dedup([line for line in _lines(tmp_path) if P.reject_reason(line) is None])
    assert kept == EXPECTED


@pytest.mark.parametrize(
    "line, reason",
    [
        ("Biçim - Hücreler", "short"),
        ("=EĞERORTALAMA(A2:A6;B2:B6) ve =TOPLA(A1:A5)", "code"),
        ("DOS/OS2-869/Modern (Greek) 437 850 862 866", "symbols"),
        ("Choose Format - Cells and select the font that you want to use.", "english"),
        ("Database Report Toolbar", "not_turkish"),
        ("Getiri tahvilin yıllık getirisidir.", None),  # one Turkish letter, one copula suffix
        ("If...Then bloğunun dışına sıçramak için GoTo ve GoSub kullanabilirsiniz.", None),
        ("Kalan değer, =A1*2 formülü ile kolayca hesaplanır ve hücreye yazılır.", None),
    ],
)
def test_reject_reason(line, reason):
    assert P.reject_reason(line) == reason


def test_normalize():
    assert P.normalize("  Ku\u0308c\u0327u\u0308k\u00a0\u00a0harf\u00ad\n ") == "Küçük harf"  # NFC, NBSP, soft hyphen


def test_split_is_deterministic_and_disjoint():
    lines = [f"Bu {i}. örnek satırdır." for i in range(2000)]
    train, heldout = P.split(lines, 0.1)
    assert (train, heldout) == P.split(list(lines), 0.1)
    assert not set(train) & set(heldout) and len(train) + len(heldout) == len(lines)
    assert 120 < len(heldout) < 280  # ~10%
    assert P.split(lines[::-1], 0.1)[1] == heldout[::-1]  # by content, not by position
    assert P.split(lines, 0.0) == (lines, [])


def test_main_end_to_end(fake_deb, tmp_path):
    out = tmp_path / "out"
    assert P.main(["--deb", str(fake_deb), "--out", str(out), "--heldout-fraction", "0.5"]) == 0
    train = (out / "train.txt").read_text(encoding="utf-8").splitlines()
    heldout = (out / "heldout.txt").read_text(encoding="utf-8").splitlines()
    assert sorted(train + heldout) == sorted(EXPECTED)
    stats = json.loads((out / "stats.json").read_text(encoding="utf-8"))
    assert stats["source"]["version"] == "4:1.2.3-1" and len(stats["source"]["deb_sha256"]) == 64
    assert stats["after_dedup"]["lines"] == len(EXPECTED) == stats["train"]["lines"] + stats["heldout"]["lines"]
    assert stats["after_filter"]["lines"] == len(EXPECTED) + 1  # one duplicate paragraph
    assert sorted(p.name for p in out.iterdir()) == ["heldout.txt", "stats.json", "train.txt"]  # no temp files


def test_main_fails_cleanly_without_deb(tmp_path, capsys):
    assert P.main(["--deb", str(tmp_path / "missing.deb"), "--out", str(tmp_path / "out")]) != 0
    assert "error" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
