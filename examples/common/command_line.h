// How Tessera's programs (tools, examples, benchmarks, test helpers) read
// their command line: a CLI11 App declares every option with its meaning
// and default, and parse_command_line() runs it with the same behaviour
// everywhere: -h/--help prints the options and exits 0; a bad command line
// prints what is wrong and exits non-zero.
//
//   int main(int argc, char** argv) {
//     int64_t steps = 300;
//     CLI::App app{"Trains a small model.", "my_program"};
//     app.option_defaults()->always_capture_default();  // show defaults in --help
//     app.add_option("--steps", steps, "training steps");
//     if (auto code = tessera::examples::parse_command_line(app, argc, argv)) return *code;
//     ...
//   }
//
// Thread-safety: call from main() only (CLI11 prints to stdout and stderr).
#pragma once

#include <CLI/CLI.hpp>
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <optional>
#include <string>
#include <vector>

namespace tessera::examples {

// Parses argv (argv[0] is the program) into `app`'s options and callbacks.
// Returns std::nullopt when the program should go on; otherwise the code
// main() should return: 0 after -h/--help (the help text is on stdout), or
// `usage_error_code` after a bad command line (the message is on stderr).
// Arguments that no option or positional takes are reported first, before
// a missing required option, as "unknown option '--x'" (every unknown
// option) or "unexpected argument 'x'" (the first, when no unknown option
// explains it), so that a misspelt option is what the user reads about.
[[nodiscard]] inline std::optional<int> parse_command_line(CLI::App& app, int argc, char** argv,
                                                           int usage_error_code = 2) {
  try {
    app.parse(argc, argv);
    return std::nullopt;
  } catch (const CLI::ParseError& e) {
    if (e.get_exit_code() == static_cast<int>(CLI::ExitCodes::Success)) {
      return app.exit(e);  // -h/--help: prints the help text
    }
    const std::vector<std::string> unexpected = app.remaining(/*recurse=*/true);
    if (unexpected.empty()) {
      app.exit(e);  // prints CLI11's message and "Run with --help ..."
      return usage_error_code;
    }
    std::string what;
    for (const std::string& a : unexpected) {
      if (a.size() > 1 && a[0] == '-')
        what += (what.empty() ? "" : ", ") + ("unknown option '" + a + "'");
    }
    if (what.empty()) what = "unexpected argument '" + unexpected.front() + "'";
    std::cerr << app.get_name() << ": " << what << "\nRun with --help for more information.\n";
    return usage_error_code;
  }
}

// Checks that an option's value is a number >= `min`; --help shows ">=min"
// next to the type (CLI11's Range would print its whole interval). Values
// that are not numbers are refused here too, naming the value.
inline CLI::Validator at_least(double min) {
  char shown[32];
  std::snprintf(shown, sizeof(shown), ">=%g", min);
  return CLI::Validator(
      [min, shown = std::string(shown)](std::string& value) -> std::string {
        char* end = nullptr;
        const double v = std::strtod(value.c_str(), &end);
        if (value.empty() || *end != '\0') return "'" + value + "' is not a number";
        return v >= min ? "" : "must be " + shown + ", got " + value;
      },
      shown);
}

// Checks that an option's value is a number above zero (shown as POSITIVE).
inline CLI::Validator positive() {
  return CLI::Validator(
      [](std::string& value) -> std::string {
        char* end = nullptr;
        const double v = std::strtod(value.c_str(), &end);
        if (value.empty() || *end != '\0') return "'" + value + "' is not a number";
        return v > 0 ? "" : "must be positive, got " + value;
      },
      "POSITIVE");
}

}  // namespace tessera::examples
