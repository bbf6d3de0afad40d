#include "tessera/rlhf/protocol.h"

#include <algorithm>

#include <ATen/ATen.h>

#include "tessera/core/error.h"
#include "tessera/core/tensor.h"

namespace tessera::rlhf {

const char* protocol_name(Protocol protocol) {
  switch (protocol) {
    case Protocol::kOneToAll:
      return "ONE_TO_ALL";
    case Protocol::kAllToAll:
      return "ALL_TO_ALL";
    case Protocol::kRankZero:
      return "RANK_ZERO";
    case Protocol::kDpCompute:
      return "DP_COMPUTE";
  }
  return "?";
}

int64_t batch_rows(const Batch& batch) {
  TESSERA_CHECK(!batch.empty(), InvalidArgument, "batch has no tensors");
  int64_t rows = -1;
  for (const auto& [name, t] : batch) {
    TESSERA_CHECK(t.defined() && t.dim() >= 1, InvalidArgument, "batch tensor '", name,
                  "' has no row dimension");
    if (rows < 0) rows = t.size(0);
    TESSERA_CHECK(t.size(0) == rows, InvalidArgument, "batch tensor '", name, "' has ", t.size(0),
                  " rows, the others ", rows);
  }
  return rows;
}

DpChunk dp_compute_chunk(int64_t rows, int dp, int dp_rank) {
  TESSERA_CHECK(rows >= 1 && dp >= 1 && dp_rank >= 0 && dp_rank < dp, InvalidArgument,
                "DP_COMPUTE: ", rows, " rows over dp rank ", dp_rank, " of ", dp);
  const int64_t chunk = (rows + dp - 1) / dp;
  DpChunk c;
  c.begin = dp_rank * chunk;
  c.end = std::min(c.begin + chunk, rows);
  if (c.begin >= rows) {  // a chunk of padding only
    c.begin = rows - 1;
    c.end = rows;
    c.padding = chunk;
  } else {
    c.padding = chunk - (c.end - c.begin);
  }
  c.repeat = chunk - (c.end - c.begin);
  return c;
}

namespace {

Batch cat_batches(const std::vector<const Batch*>& parts) {
  TESSERA_CHECK(!parts.empty(), InvalidArgument, "collect: no results");
  Batch out;
  for (const auto& [name, first] : *parts.front()) {
    std::vector<at::Tensor> pieces;
    for (size_t i = 0; i < parts.size(); ++i) {
      auto it = parts[i]->find(name);
      TESSERA_CHECK(it != parts[i]->end(), InvalidArgument, "collect: result ", i, " lacks '", name,
                    "'");
      pieces.push_back(it->second);
    }
    out[name] = at::cat(pieces, 0);
  }
  for (size_t i = 0; i < parts.size(); ++i) {
    TESSERA_CHECK(parts[i]->size() == out.size(), InvalidArgument, "collect: result ", i,
                  " has other tensors than result 0");
  }
  return out;
}

}  // namespace

Dispatched dispatch(Protocol protocol, const WorkerMesh& mesh, const Batch& batch,
                    const std::vector<Batch>& per_worker_input) {
  TESSERA_CHECK(mesh.dp >= 1 && mesh.tp >= 1, InvalidArgument, "dispatch: worker mesh ", mesh.dp,
                " x ", mesh.tp);
  const int n = mesh.size();
  Dispatched out;
  switch (protocol) {
    case Protocol::kOneToAll:
    case Protocol::kRankZero:
      batch_rows(batch);
      out.per_worker.assign(n, batch);
      return out;
    case Protocol::kAllToAll:
      TESSERA_CHECK(static_cast<int>(per_worker_input.size()) == n, InvalidArgument,
                    "dispatch ALL_TO_ALL: ", per_worker_input.size(), " batches for ", n,
                    " workers");
      out.per_worker = per_worker_input;
      return out;
    case Protocol::kDpCompute: {
      const int64_t rows = batch_rows(batch);
      TESSERA_CHECK(rows >= 1, InvalidArgument, "dispatch DP_COMPUTE: empty batch");
      std::vector<Batch> chunks(mesh.dp);
      for (int r = 0; r < mesh.dp; ++r) {
        const DpChunk c = dp_compute_chunk(rows, mesh.dp, r);
        out.pad += c.padding;
        for (const auto& [name, t] : batch) {
          at::Tensor part = t.narrow(0, c.begin, c.end - c.begin);
          if (c.repeat > 0) {
            // Repeat the last row: valid input for the workers, dropped on collect.
            std::vector<int64_t> reps(t.dim(), 1);
            reps[0] = c.repeat;
            part = at::cat({part, t.narrow(0, c.end - 1, 1).repeat(reps)}, 0);
          }
          chunks[r][name] = part;
        }
      }
      for (int w = 0; w < n; ++w) out.per_worker.push_back(chunks[mesh.dp_rank(w)]);
      return out;
    }
  }
  TESSERA_THROW(InvalidArgument, "dispatch: unknown protocol");
}

Batch collect(Protocol protocol, const WorkerMesh& mesh, const std::vector<Batch>& results,
              int64_t pad) {
  const int n = mesh.size();
  TESSERA_CHECK(static_cast<int>(results.size()) == n, InvalidArgument, "collect ",
                protocol_name(protocol), ": ", results.size(), " results from ", n, " workers");
  std::vector<const Batch*> parts;
  switch (protocol) {
    case Protocol::kOneToAll:
    case Protocol::kAllToAll:
      for (const Batch& b : results) parts.push_back(&b);
      return cat_batches(parts);
    case Protocol::kRankZero:
      return results.front();
    case Protocol::kDpCompute: {
      for (int w = 0; w < n; ++w) {
        if (mesh.tp_rank(w) == 0) parts.push_back(&results[w]);
      }
      Batch out = cat_batches(parts);
      if (pad > 0) {
        for (auto& [name, t] : out) {
          TESSERA_CHECK(t.size(0) > pad, InvalidArgument, "collect DP_COMPUTE: '", name, "' has ",
                        t.size(0), " rows, fewer than the padding ", pad);
          t = t.narrow(0, 0, t.size(0) - pad);
        }
      }
      return out;
    }
  }
  TESSERA_THROW(InvalidArgument, "collect: unknown protocol");
}

}  // namespace tessera::rlhf
