#include "tensor_parallel.h"

#include <ATen/ATen.h>

#include "tessera/core/error.h"

namespace tessera::serve::detail {

namespace {

// The message as int64 words: a header [stop, copies, ids, sequences, rows,
// hidden_only], the copies (src, dst), the ids, each sequence (tokens,
// start, adapter, table length, table...), the logits rows.
std::vector<int64_t> encode(const StepMessage& m) {
  std::vector<int64_t> w = {m.stop,
                            static_cast<int64_t>(m.copies.size()),
                            static_cast<int64_t>(m.ids.size()),
                            static_cast<int64_t>(m.batch.sequences.size()),
                            static_cast<int64_t>(m.batch.logits_rows.size()),
                            m.hidden_only};
  for (const BlockCopy& c : m.copies) {
    w.push_back(c.src);
    w.push_back(c.dst);
  }
  w.insert(w.end(), m.ids.begin(), m.ids.end());
  for (const nn::PagedBatch::Sequence& s : m.batch.sequences) {
    w.push_back(s.num_tokens);
    w.push_back(s.start_position);
    w.push_back(s.adapter);
    w.push_back(static_cast<int64_t>(s.block_table.size()));
    w.insert(w.end(), s.block_table.begin(), s.block_table.end());
  }
  w.insert(w.end(), m.batch.logits_rows.begin(), m.batch.logits_rows.end());
  return w;
}

class Reader {
 public:
  Reader(const int64_t* words, int64_t size) : w_(words), size_(size) {}
  int64_t next() {
    TESSERA_CHECK(at_ < size_, DataLoss, "tensor-parallel step message: ", size_,
                  " words end early");
    return w_[at_++];
  }
  int64_t count() {
    const int64_t n = next();
    TESSERA_CHECK(n >= 0 && n <= size_, DataLoss, "tensor-parallel step message: count ", n,
                  " in a message of ", size_, " words");
    return n;
  }
  bool done() const { return at_ == size_; }

 private:
  const int64_t* w_;
  int64_t size_, at_ = 0;
};

}  // namespace

void broadcast_step(dist::ProcessGroup& group, const StepMessage& message) {
  const std::vector<int64_t> words = encode(message);
  at::Tensor length = at::tensor({static_cast<int64_t>(words.size())}, at::kLong);
  group.broadcast(length, 0).wait();
  at::Tensor payload = at::tensor(words, at::kLong);
  group.broadcast(payload, 0).wait();
}

StepMessage receive_step(dist::ProcessGroup& group) {
  at::Tensor length = at::zeros({1}, at::kLong);
  group.broadcast(length, 0).wait();
  const int64_t n = length.item<int64_t>();
  TESSERA_CHECK(n >= 6, DataLoss, "tensor-parallel step message of ", n, " words");
  at::Tensor payload = at::empty({n}, at::kLong);
  group.broadcast(payload, 0).wait();
  Reader r(payload.data_ptr<int64_t>(), n);
  StepMessage m;
  m.stop = r.next() != 0;
  const int64_t copies = r.count(), ids = r.count(), sequences = r.count(), rows = r.count();
  m.hidden_only = r.next() != 0;
  for (int64_t i = 0; i < copies; ++i) {
    BlockCopy c;
    c.src = static_cast<BlockId>(r.next());
    c.dst = static_cast<BlockId>(r.next());
    m.copies.push_back(c);
  }
  for (int64_t i = 0; i < ids; ++i) m.ids.push_back(r.next());
  for (int64_t i = 0; i < sequences; ++i) {
    nn::PagedBatch::Sequence s;
    s.num_tokens = r.next();
    s.start_position = r.next();
    s.adapter = r.next();
    const int64_t blocks = r.count();
    for (int64_t b = 0; b < blocks; ++b) s.block_table.push_back(static_cast<int32_t>(r.next()));
    m.batch.sequences.push_back(std::move(s));
  }
  for (int64_t i = 0; i < rows; ++i) m.batch.logits_rows.push_back(r.next());
  TESSERA_CHECK(r.done(), DataLoss, "tensor-parallel step message: words left over");
  return m;
}

at::Tensor run_step(nn::Transformer& model, nn::PagedKVCache& cache, const StepMessage& message) {
  for (const BlockCopy& c : message.copies) cache.copy_block(c.src, c.dst);
  if (message.ids.empty()) return {};
  nn::PagedBatch batch = message.batch;
  batch.cache = &cache;
  nn::ForwardOptions fo;
  fo.paged = &batch;
  fo.hidden_only = message.hidden_only;
  nn::ForwardOutput out = model.forward(at::tensor(message.ids, at::kLong).view({1, -1}), fo);
  return out.logits;
}

}  // namespace tessera::serve::detail
