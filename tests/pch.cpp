// Anchor for the shared precompiled header of the test binaries.
int main() { return 0; }
