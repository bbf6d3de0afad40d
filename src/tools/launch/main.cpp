// tessera-launch: start N local ranks of a program with the torchrun
// variables. See include/tessera/dist/launcher.h.
//
//   tessera-launch --nproc 4 -- ./my_training_program --config run.json
//   tessera-launch --help      every option with its meaning and default
#include <iostream>

#include "tessera/core/error.h"
#include "tessera/dist/launcher.h"

int main(int argc, char** argv) {
  std::vector<std::string> args(argv + 1, argv + argc);
  try {
    auto options = tessera::dist::parse_launch_args(args);
    if (options.help) {
      std::cout << tessera::dist::launch_usage();
      return 0;
    }
    return tessera::dist::launch(options, std::cerr);
  } catch (const tessera::Error& e) {
    std::cerr << "tessera-launch: " << e.message() << "\n";
    return 2;
  }
}
