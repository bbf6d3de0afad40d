// Content hashes of token blocks for the prefix cache (private to serve).
//
// A block's hash covers the hash of the block before it, so equal hashes
// mean equal prefixes up to a 64-bit collision; the block manager also keeps
// each cached block's tokens and compares them on a hit, so a collision costs
// a cache miss, never wrong KV.
#pragma once

#include <cstdint>
#include <string_view>

namespace tessera::serve {

// splitmix64's finaliser: a bijective 64-bit mix with full avalanche.
inline uint64_t mix64(uint64_t x) {
  x ^= x >> 30;
  x *= 0xbf58476d1ce4e5b9ULL;
  x ^= x >> 27;
  x *= 0x94d049bb133111ebULL;
  x ^= x >> 31;
  return x;
}

// Hash that seeds a sequence's chain: distinct salts give unrelated chains.
inline uint64_t hash_salt(std::string_view salt) {
  uint64_t h = 0xcbf29ce484222325ULL;  // FNV-1a over the bytes, then mixed
  for (unsigned char c : salt) {
    h ^= c;
    h *= 0x100000001b3ULL;
  }
  return mix64(h ^ (static_cast<uint64_t>(salt.size()) << 1));
}

// Hash of `n` tokens following a prefix whose hash is `parent`.
inline uint64_t hash_token_block(uint64_t parent, const int64_t* tokens, int64_t n) {
  uint64_t h = mix64(parent + 0x9e3779b97f4a7c15ULL);
  for (int64_t i = 0; i < n; ++i) {
    h = mix64(h ^ mix64(static_cast<uint64_t>(tokens[i]) + 0x632be59bd9b4e019ULL));
  }
  return h;
}

}  // namespace tessera::serve
