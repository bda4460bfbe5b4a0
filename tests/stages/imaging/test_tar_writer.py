"""The fast USTAR writer: what Python's tarfile and GNU tar read, byte-identical for the same samples."""
from __future__ import annotations

import io
import subprocess
import tarfile

from stages.imaging.tar_writer import TarShardWriter


def write(samples) -> tuple[bytes, list[int]]:
    buf = io.BytesIO()
    with TarShardWriter(buf) as tar:
        offsets = [tar.write_sample(key, members) for key, members in samples]
    return buf.getvalue(), offsets


def test_members_checksums_and_offsets_read_back(tmp_path):
    samples = [("000000000", {"jpg": b"\xff\xd8" + bytes(1000), "cls": b"3", "json": b'{"k": 1}'}),
               ("000000001", {"png": b"", "txt": "é".encode()}), ("k" * 90, {"jpg": bytes(512)})]
    data, offsets = write(samples)
    assert len(data) % (20 * 512) == 0
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:  # tarfile verifies every header checksum
        got = [(m.name, tf.extractfile(m).read(), m.mtime, m.mode) for m in tf]
    assert got == [(f"{k}.{e}", d, 0, 0o444) for k, m in samples for e, d in m.items()]
    assert [data[o:o + len(m[next(iter(m))])] for o, (_, m) in zip(offsets, samples)] == \
        [m[next(iter(m))] for _, m in samples]
    (tmp_path / "t.tar").write_bytes(data)
    listing = subprocess.run(["tar", "-tf", str(tmp_path / "t.tar")], capture_output=True, text=True, check=True)
    assert listing.stdout.split() == [name for name, *_ in got]
    assert write(samples)[0] == data  # deterministic
