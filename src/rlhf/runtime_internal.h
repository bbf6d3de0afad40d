// Shared between the driver and the worker side of the rlhf runtime.
#pragma once

#include <string>

namespace tessera::rlhf::internal {

// Environment the driver sets for its workers.
inline constexpr const char* kEnvDriver = "TESSERA_RLHF_DRIVER";    // driver's host:port
inline constexpr const char* kEnvRun = "TESSERA_RLHF_RUN";          // run id
inline constexpr const char* kEnvProcess = "TESSERA_RLHF_PROCESS";  // global process index
inline constexpr const char* kEnvPool = "TESSERA_RLHF_POOL";        // pool name
inline constexpr const char* kEnvRoles = "TESSERA_RLHF_ROLES";      // JSON [{name,type,config}]
inline constexpr const char* kEnvScratch = "TESSERA_RLHF_SCRATCH";  // data-plane directory
inline constexpr const char* kEnvMaxMessage = "TESSERA_RLHF_MAX_MESSAGE";
inline constexpr const char* kEnvFault = "TESSERA_RLHF_FAULT";

// Where a process publishes a batch for the others to read.
inline std::string shared_batch_path(const std::string& scratch, const std::string& batch,
                                     int process) {
  std::string safe;
  for (char c : batch) safe += (c == '/' ? '_' : c);
  return scratch + "/" + safe + ".p" + std::to_string(process) + ".safetensors";
}

}  // namespace tessera::rlhf::internal
