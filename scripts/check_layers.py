#!/usr/bin/env python3
"""Checks that library sources include only headers of the layers they may use.

    scripts/check_layers.py [ROOT] [--layers FILE]

ROOT (default: the repository) holds src/ and include/; the graph is
ROOT/cmake/layers.txt unless --layers names another file.
A file's module is its folder: src/<module>/..., include/tessera/<module>/...
(core's torch-free headers and sources belong to `base`). Every
#include "tessera/<module>/..." must name the file's own module or one that
cmake/layers.txt lets it use, directly or through others. Tools (src/tools/),
examples, tests and benchmarks may include anything. Prints one line per
violation, "file:line: module X includes tessera/Y/...; X may use: ...",
and exits 1 if there is any.
"""
import os
import re
import sys

# core's parts that need LibTorch; everything else in core/ is `base`.
CORE_TORCH = {"tensor", "runtime"}
INCLUDE = re.compile(r'^\s*#\s*include\s+"tessera/([a-z_0-9]+)/([^"]+)"')


def read_layers(path):
    direct = {}
    with open(path) as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            name, _, deps = line.partition(":")
            direct[name.strip()] = deps.split()
    allowed = {}

    def closure(module, seen=()):
        if module in allowed:
            return allowed[module]
        if module in seen:
            sys.exit(f"{path}: cycle through '{module}'")
        if module not in direct:
            sys.exit(f"{path}: unknown module '{module}'")
        result = {module}
        for dep in direct[module]:
            result |= closure(dep, seen + (module,))
        allowed[module] = result
        return result

    for module in direct:
        closure(module)
    return allowed


def module_of_header(module, rest):
    stem = os.path.splitext(os.path.basename(rest))[0]
    if module == "core" and stem not in CORE_TORCH:
        return "base"
    return module


def module_of_file(relpath):
    parts = relpath.split(os.sep)
    if parts[0] == "src" and len(parts) >= 3:
        module = parts[1]
    elif parts[:2] == ["include", "tessera"] and len(parts) >= 4:
        module = parts[2]
    else:
        return None
    if module == "tools":
        return None
    if module == "core":
        stem = os.path.splitext(parts[-1])[0]
        return "core" if stem in CORE_TORCH else "base"
    return module


def main():
    args = sys.argv[1:]
    layers = None
    if "--layers" in args:
        i = args.index("--layers")
        layers = args[i + 1]
        del args[i:i + 2]
    root = os.path.abspath(args[0] if args else os.path.join(os.path.dirname(__file__), ".."))
    allowed = read_layers(layers or os.path.join(root, "cmake", "layers.txt"))
    problems = []
    for top in ("src", "include"):
        for dirpath, _, files in os.walk(os.path.join(root, top)):
            for name in sorted(files):
                if not name.endswith((".h", ".hpp", ".cpp", ".cc", ".cu", ".cuh")):
                    continue
                path = os.path.join(dirpath, name)
                rel = os.path.relpath(path, root)
                module = module_of_file(rel)
                if module is None:
                    continue
                if module not in allowed:
                    problems.append(f"{rel}: module '{module}' is not in cmake/layers.txt")
                    continue
                with open(path, encoding="utf-8", errors="replace") as f:
                    for number, line in enumerate(f, 1):
                        m = INCLUDE.match(line)
                        if not m:
                            continue
                        target = module_of_header(m.group(1), m.group(2))
                        if target not in allowed[module]:
                            problems.append(
                                f"{rel}:{number}: module {module} includes tessera/{m.group(1)}/{m.group(2)}; "
                                f"{module} may use: {' '.join(sorted(allowed[module]))}")
    for p in problems:
        print(p)
    if problems:
        print(f"{len(problems)} include(s) across layers", file=sys.stderr)
        return 1
    print(f"layers: every include of src/ and include/ follows cmake/layers.txt")
    return 0


if __name__ == "__main__":
    sys.exit(main())
