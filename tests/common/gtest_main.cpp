// main() of the test binaries that do not bring their own.
#include "test_main.h"

int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  return tessera::testutil::run_all_tests();
}
