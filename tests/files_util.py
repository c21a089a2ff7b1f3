"""Files a test case asks for: name -> bytes, text (written as UTF-8, lone surrogates kept), or a
function that makes the file at that path (a link, a device, a read-only file...)."""

import os


def make_files(files: dict | None, folder) -> None:
    for name, content in (files or {}).items():
        path = os.path.join(folder, name)
        if callable(content):
            content(path)
        else:
            with open(path, "wb") as f:
                f.write(content.encode("utf-8", "surrogatepass") if isinstance(content, str) else content)
