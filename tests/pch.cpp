// Anchor for the shared precompiled header of the test binaries. As a
// program it does nothing: no arguments exits 0, -h/--help prints one line
// and exits 0, anything else is refused (exit 2), like the other programs.
#include <cstdio>
#include <cstring>

int main(int argc, char** argv) {
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "-h") != 0 && std::strcmp(argv[i], "--help") != 0) {
      std::fprintf(stderr, "tessera_test_pch: unexpected argument '%s' (it takes none)\n", argv[i]);
      return 2;
    }
  }
  if (argc > 1) {
    std::puts(
        "usage: tessera_test_pch  (anchors the test binaries' precompiled header; does nothing)");
  }
  return 0;
}
