"""Regenerate the vendored data (``graftkit/data/vendor``) from a ``shared/data`` folder.

    python -m graftkit.data.vendor_build /path/to/shared/data --out graftkit/data/vendor

``shared/data`` holds ``babi/`` (bAbI v1.2: ``en/``, ``en-10k/``, ``LICENSE.txt``, ``README.txt``) and
``haystack/`` (Project Gutenberg books). The script checks every source file against the sha256 pinned
below, then writes:

- ``babi/{stem}_{split}.txt.xz`` for :data:`BABI_TASKS`: train from ``en-10k`` (10k questions; qa3
  falls back to ``en`` because its ``en-10k`` train file is not in the source), test from ``en``
  (1k questions; the ``en-10k`` test files are byte-identical, which the script verifies);
- ``babi/LICENSE.txt`` and ``babi/README.txt``, copied unchanged;
- ``books/{name}.txt.xz`` for :data:`BOOKS`: Project Gutenberg header, footer, producer credit and
  transcriber's notes removed, CRLF turned into LF, byte-order mark dropped
  (:func:`graftkit.data.books.strip_gutenberg`);
- ``MANIFEST.json``: for each file its source, the source's sha256, the sha256 and size of the
  decompressed content, and what was done to it.

``NOTICE.md`` (licenses and attribution) is maintained by hand next to these files.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import lzma
import sys
from pathlib import Path

from graftkit.data.babi import parse_babi
from graftkit.data.books import VENDORED_BOOKS, strip_gutenberg
from graftkit.data.tasks import TASK_FILES, TASKS

#: Tasks to vendor (the keys of :data:`graftkit.data.tasks.TASKS`).
BABI_TASKS = tuple(TASKS)

#: Vendored book name -> (haystack file, title, author, Project Gutenberg ebook number).
BOOKS = {
    "pg2701_moby_dick": ("2701-0.txt", "Moby Dick; or The Whale", "Herman Melville", 2701),
    "pg98_a_tale_of_two_cities": ("98-0.txt", "A Tale of Two Cities", "Charles Dickens", 98),
    "pg120_treasure_island": ("120-0.txt", "Treasure Island", "Robert Louis Stevenson", 120),
}

#: sha256 of the source files, as recorded in shared/data/*/SOURCE.md.
SOURCE_SHA256 = {
    "babi/LICENSE.txt": "d12f09a636365a040fd581ebab6bf018d6fe61973c6d4862f841a6aca2f53efa",
    "babi/README.txt": "1f2c9fd266ec732f988403122a1d76f552f24ccd3904230f2f9c65df578abb86",
    "babi/en/qa1_single-supporting-fact_test.txt": "55acf66cef2f6d798e2aa1d056e1ec8f24e910ea9215b639450574321132959b",
    "babi/en/qa2_two-supporting-facts_test.txt": "eff93fb9cd81ba02eb765772cf7cc269769ed44ec71cbbbc19cfb16ee5eba0f6",
    "babi/en/qa3_three-supporting-facts_test.txt": "17795c977100baf8188f386522ae301b62d6c1a13efc01b3aea781e588b4d57f",
    "babi/en/qa3_three-supporting-facts_train.txt": "a6e78019f36a02a7ed71fe6aaded0b563ff09c8deec392931801fcd9c6af4d60",
    "babi/en/qa4_two-arg-relations_test.txt": "07f0ca18ddeea9eed4ba6d59e162adcb0ce44815721114b3540d92825509331e",
    "babi/en/qa5_three-arg-relations_test.txt": "ec825c1c8a76e63a31f0d7a7763cd63740e98332fa9bdf246a19068949bd5f97",
    "babi/en-10k/qa1_single-supporting-fact_test.txt": "55acf66cef2f6d798e2aa1d056e1ec8f24e910ea9215b639450574321132959b",
    "babi/en-10k/qa1_single-supporting-fact_train.txt": "749ea9f7c99070feb2d88c975a254417a0dcc8274add4435ae5ae24c7afc7e9d",
    "babi/en-10k/qa2_two-supporting-facts_test.txt": "eff93fb9cd81ba02eb765772cf7cc269769ed44ec71cbbbc19cfb16ee5eba0f6",
    "babi/en-10k/qa2_two-supporting-facts_train.txt": "d4074c0c5d54f70ce2f538056ce2b6ef6a313da336da4245f1a24f1298e37ef3",
    "babi/en-10k/qa3_three-supporting-facts_test.txt": "17795c977100baf8188f386522ae301b62d6c1a13efc01b3aea781e588b4d57f",
    "babi/en-10k/qa4_two-arg-relations_test.txt": "07f0ca18ddeea9eed4ba6d59e162adcb0ce44815721114b3540d92825509331e",
    "babi/en-10k/qa4_two-arg-relations_train.txt": "5d11b821d35234988ab907866aa7ce718e6b6d751acf63bdef52262afb59f12c",
    "babi/en-10k/qa5_three-arg-relations_test.txt": "ec825c1c8a76e63a31f0d7a7763cd63740e98332fa9bdf246a19068949bd5f97",
    "babi/en-10k/qa5_three-arg-relations_train.txt": "2506910935b701bac64fc8b1d7ff12bd8d0f47ceefca183454282bec784c12a5",
    "haystack/2701-0.txt": "baf9b04fcf6e0008f30eaaa6697277751448c1070b20175e0082f28cbb161fd3",
    "haystack/98-0.txt": "2fcfa071498b30724bd1bd714ba89e38477d632b86d74e87559f6259d3917e36",
    "haystack/120-0.txt": "e57c204e67befca99287e0cc94c7a65c514896369520d1bf067c89809edb765f",
}

XZ_PRESET = 9 | lzma.PRESET_EXTREME


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _read_source(shared: Path, rel: str) -> bytes:
    data = (shared / rel).read_bytes()
    expected = SOURCE_SHA256.get(rel)
    if expected is None:
        raise SystemExit(f"{rel}: no pinned sha256 in vendor_build.SOURCE_SHA256; add it after checking the file")
    if sha256(data) != expected:
        raise SystemExit(f"{rel}: sha256 {sha256(data)} does not match the pinned {expected}")
    return data


def _write_xz(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(lzma.compress(data, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64, preset=XZ_PRESET))


def _babi_entries(shared: Path, out: Path) -> list[dict]:
    entries = []
    for task in BABI_TASKS:
        stem = TASK_FILES[task]
        for split in ("train", "test"):
            name = f"{stem}_{split}.txt"
            order = ["en-10k", "en"] if split == "train" else ["en", "en-10k"]
            rel = next((f"babi/{d}/{name}" for d in order if (shared / "babi" / d / name).is_file()), None)
            if rel is None:
                raise SystemExit(f"no source for {name} under {shared / 'babi'}")
            data = _read_source(shared, rel)
            note = f"copied unchanged from {rel}"
            twin = shared / "babi" / "en-10k" / name
            if split == "test" and twin.is_file():
                same = sha256(twin.read_bytes()) == sha256(data)
                note += "; byte-identical to en-10k/" + name if same else "; DIFFERS from en-10k/" + name
            if split == "train" and not rel.startswith("babi/en-10k/"):
                note += f"; en-10k/{name} is not in the source, so this split has the 1k-question en file"
            questions = parse_babi(data.decode("utf-8"), task, split, source=rel)
            _write_xz(out / "babi" / (name + ".xz"), data)
            entries.append(
                {
                    "file": f"babi/{name}.xz",
                    "task": task,
                    "split": split,
                    "source": rel,
                    "source_sha256": SOURCE_SHA256[rel],
                    "sha256": sha256(data),
                    "bytes": len(data),
                    "questions": len(questions),
                    "stories": questions[-1].story + 1,
                    "license": "CC BY 3.0",
                    "note": note,
                }
            )
    for rel in ("babi/LICENSE.txt", "babi/README.txt"):
        data = _read_source(shared, rel)
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_bytes(data)
        entries.append(
            {"file": rel, "source": rel, "source_sha256": sha256(data), "sha256": sha256(data), "bytes": len(data), "note": "copied unchanged"}
        )
    return entries


def _book_entries(shared: Path, out: Path) -> list[dict]:
    split_of = {name: split for split, names in VENDORED_BOOKS.items() for name in names}
    entries = []
    for name, (filename, title, author, ebook) in BOOKS.items():
        rel = f"haystack/{filename}"
        raw = _read_source(shared, rel)
        data = strip_gutenberg(raw.decode("utf-8")).encode("utf-8")
        _write_xz(out / "books" / f"{name}.txt.xz", data)
        entries.append(
            {
                "file": f"books/{name}.txt.xz",
                "split": split_of[name],
                "title": title,
                "author": author,
                "gutenberg_ebook": ebook,
                "source": rel,
                "source_sha256": SOURCE_SHA256[rel],
                "sha256": sha256(data),
                "bytes": len(data),
                "license": "public domain (Project Gutenberg header and license footer removed)",
                "note": "strip_gutenberg: text between the START and END lines; producer credit, end note and "
                "paragraphs mentioning Project Gutenberg (transcriber's notes) removed; CRLF -> LF; BOM removed",
            }
        )
    return entries


def build(shared: Path, out: Path) -> dict:
    """Write the vendored files from ``shared`` (a ``shared/data`` folder) into ``out``; return the manifest."""
    shared, out = Path(shared), Path(out)
    manifest = {
        "description": "graftkit vendored data: bAbI v1.2 tasks and public-domain background books; see NOTICE.md",
        "generator": "python -m graftkit.data.vendor_build SHARED_DATA --out graftkit/data/vendor",
        "files": _babi_entries(shared, out) + _book_entries(shared, out),
    }
    (out / "MANIFEST.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("shared", type=Path, help="the shared/data folder (with babi/ and haystack/)")
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).resolve().parent / "vendor", help="output folder (default: this package's vendor/)"
    )
    args = parser.parse_args(argv)
    manifest = build(args.shared, args.out)
    for entry in manifest["files"]:
        size = (args.out / entry["file"]).stat().st_size
        print(f"{entry['file']:55s} {size:>9,d} bytes  <- {entry['source']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
