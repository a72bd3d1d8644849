#!/usr/bin/env python3
"""Seed corpora for the fuzz targets, made from our fixtures (torch-free).

    make_seeds.py FIXTURES_DIR OUT_DIR

OUT_DIR/<target>/ gets one file per seed:
- fuzz_safetensors_header: for every fixture *.safetensors (a) its length prefix
  and header with the data cut to 256 bytes (what the header parser sees first),
  (b) the same names, dtypes and metadata with every dimension clamped to 2 and
  the offsets recomputed, a small valid file; plus a few hand-made files.
- fuzz_index: every fixture's model.safetensors.index.json, plus small edge cases.
- fuzz_job_yaml: every configs/*.yaml and the jobs written in tests/test_jobs.cpp
  (its raw-string jobs, its bad jobs and its malformed inputs).
Where FIXTURES_DIR holds no fixtures, only the hand-made seeds are written.
"""
import codecs
import glob
import hashlib
import json
import os
import re
import struct
import sys

REPO = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2,
            "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


def safetensors(header, data=b""):
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * ((8 - len(text) % 8) % 8)
    return struct.pack("<Q", len(text)) + text + data


def shrunk(header):
    """Same names/dtypes/metadata, dims clamped to 2, data contiguous in the original order."""
    out, offset = {}, 0
    entries = [(k, v) for k, v in header.items() if k != "__metadata__"]
    entries.sort(key=lambda kv: kv[1]["data_offsets"][0])
    if "__metadata__" in header:
        out["__metadata__"] = header["__metadata__"]
    for name, entry in entries:
        shape = [min(int(d), 2) for d in entry["shape"]]
        numel = 1
        for d in shape:
            numel *= d
        size = numel * ITEMSIZE.get(entry["dtype"], 1)
        out[name] = {"dtype": entry["dtype"], "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    return safetensors(out, bytes(offset))


def fixture_files(root, suffix):
    for dirpath, _, files in os.walk(root, followlinks=False):
        for f in sorted(files):
            if f.endswith(suffix):
                yield os.path.join(dirpath, f)


C_STRING = r'"((?:[^"\\\n]|\\.)*)"'


def c_string(literal):
    """The bytes of a C string literal's body (\\n, \\", \\xNN; the tests use nothing else)."""
    return codecs.escape_decode(literal.encode("latin-1"))[0]


def test_jobs():
    """The job texts of tests/test_jobs.cpp: R"(...)" jobs, kBadJobs' texts, the malformed inputs."""
    source = open(os.path.join(REPO, "tests", "test_jobs.cpp"), encoding="utf-8").read()
    jobs = [m.encode() for m in re.findall(r'R"\((.*?)\)"', source, re.S)]
    jobs += [c_string(m) for m in re.findall(r'\{"\w+", ' + C_STRING, source)]
    malformed = re.search(r"const char\* inputs\[\] = \{(.*?)\n  \};", source, re.S)
    if malformed:
        jobs += [c_string(m) for m in re.findall(C_STRING, malformed.group(1))]
    return jobs


def main():
    fixtures, out = sys.argv[1], sys.argv[2]
    seeds = {"fuzz_safetensors_header": [], "fuzz_index": [], "fuzz_job_yaml": []}

    st = seeds["fuzz_safetensors_header"]
    two = {"a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
           "b": {"dtype": "I64", "shape": [2], "data_offsets": [24, 40]}}
    st.append(safetensors(two, b"\x01" * 40))
    st.append(safetensors(dict(two, __metadata__={"format": "pt"}), b"\x01" * 40))
    st.append(safetensors({"s": {"dtype": "BF16", "shape": [], "data_offsets": [0, 2]},
                           "e": {"dtype": "U8", "shape": [0, 4], "data_offsets": [2, 2]}}, b"\x00\x00"))
    st.append(safetensors({}))
    for path in fixture_files(fixtures, ".safetensors"):
        raw = open(path, "rb").read()
        if len(raw) < 8:
            continue
        (n,) = struct.unpack("<Q", raw[:8])
        st.append(raw[:8 + n + 256])
        try:
            st.append(shrunk(json.loads(raw[8:8 + n])))
        except (ValueError, KeyError, TypeError):
            pass

    ix = seeds["fuzz_index"]
    ix.append(json.dumps({"metadata": {"total_size": 3}, "weight_map": {"x": "s1.safetensors", "y": "s2.safetensors"}}).encode())
    ix.append(json.dumps({"weight_map": {"x": "../up.safetensors", "y": "/abs.safetensors", "z": "a/../b"}}).encode())
    ix.append(b'{"weight_map": {}}')
    for path in fixture_files(fixtures, "model.safetensors.index.json"):
        ix.append(open(path, "rb").read())

    yml = seeds["fuzz_job_yaml"]
    for path in sorted(glob.glob(os.path.join(REPO, "configs", "*.yaml"))):
        yml.append(open(path, "rb").read())
    yml += test_jobs()
    yml.append(b"[" * 3000)  # deep nesting: yaml-cpp's depth guard, not our stack
    yml.append(b"a: &x [*x]\nmodel: {path: m}\nsteps: [load]\n")  # an alias of its own anchor

    for target, items in seeds.items():
        d = os.path.join(out, target)
        os.makedirs(d, exist_ok=True)
        for item in items:
            with open(os.path.join(d, hashlib.sha1(item).hexdigest()), "wb") as f:
                f.write(item)
        print(f"{target}: {len(set(items))} seeds")


if __name__ == "__main__":
    main()
