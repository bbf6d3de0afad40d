// Private: the c10d types Tessera builds on, spelled once for LibTorch 1.13
// and 2.x. In 1.13 a backend such as ProcessGroupGloo *is* a
// c10d::ProcessGroup; from 2.0 it is a c10d::Backend held by a ProcessGroup.
// The collective signatures we call are the same on both.
#pragma once

#include <torch/version.h>
#include <torch/csrc/distributed/c10d/HashStore.hpp>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#if defined(TESSERA_WITH_C10D_NCCL)
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

#include <memory>

#include "tessera/dist/rendezvous.h"

namespace tessera::dist::detail {

#if TORCH_VERSION_MAJOR >= 2
using C10dBackend = ::c10d::Backend;
#else
using C10dBackend = ::c10d::ProcessGroup;
#endif

}  // namespace tessera::dist::detail

namespace tessera::dist {

struct Store::Impl {
  c10::intrusive_ptr<::c10d::Store> store;
};

}  // namespace tessera::dist
