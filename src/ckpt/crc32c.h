// src/ckpt/crc32c.h — CRC-32C (Castagnoli), the checksum of checkpoint blocks.
//
// Polynomial 0x1EDC6F41 (reflected 0x82F63B78), initial value and final XOR
// 0xFFFFFFFF, as in iSCSI, ext4 and LevelDB: crc32c("123456789") = 0xE3069283.
// Uses the SSE4.2 crc32 instruction when the CPU has it, otherwise a
// slice-by-8 table (~2 GB/s). Thread-safe: the tables are built at compile
// time, so there is no mutable static.
#pragma once

#include <cstddef>
#include <cstdint>

namespace tessera::ckpt::detail {

// CRC-32C of `size` bytes, continuing from `crc` (the result of a previous
// call over the preceding bytes; 0 to start).
uint32_t crc32c(const void* data, size_t size, uint32_t crc = 0);

}  // namespace tessera::ckpt::detail
