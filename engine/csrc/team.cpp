// Team (team.h): items claimed one at a time, the caller taking over a preempted helper's.
#include "team.h"

#include <torch/extension.h>

namespace {
using Clock = std::chrono::steady_clock;
// a helper spins this long for the next step, then sleeps (steps are milliseconds apart)
constexpr auto kSpin = std::chrono::microseconds(30);
// s: how long a thread out of items waits for an op's last ones before taking them over
constexpr double kMinGrace = 20e-6, kNoItemGrace = 50e-6;
std::atomic<int64_t> takeovers{0};
// tests: thread `stall_thread` sleeps stall_us while holding every stall_every-th item it claims
std::atomic<int64_t> stall_thread{-1}, stall_every{0}, stall_us{0};
thread_local int64_t claimed = 0;

void maybe_stall(int r) {
  const int64_t every = stall_every.load(std::memory_order_relaxed);
  if (every <= 0 || r != stall_thread.load(std::memory_order_relaxed) || ++claimed % every) return;
  std::this_thread::sleep_for(std::chrono::microseconds(stall_us.load()));
}
}  // namespace

bool Commit::commit() {
  if (committed_) return true;
  uint64_t expected = tag_ | kClaimed;  // no one took it over
  committed_ = state_->compare_exchange_strong(expected, tag_ | kCommitting);
  return committed_;
}

int64_t team_takeovers() { return takeovers.load(); }

void team_debug_stall(int64_t thread, int64_t every, int64_t micros) {
  stall_thread.store(thread);
  stall_us.store(micros);
  stall_every.store(every);
}

Team::Team(int helpers)
    : helpers_(helpers),
      ops_(new Op[kMaxOps]),
      base_(new int64_t[kMaxOps + 1]),
      done_(new std::atomic<int64_t>[kMaxOps * kMaxThreads]) {
  TORCH_CHECK(helpers_ < kMaxThreads, "Team: at most ", kMaxThreads, " threads");
  for (int64_t k = 0; k < kMaxOps * kMaxThreads; ++k) done_[k].store(0);
  for (int h = 1; h <= helpers_; ++h) std::thread([this, h] { helper_loop(h); }).detach();
}

void Team::stop() {
  stop_.store(true);
  std::lock_guard<std::mutex> lock(mu_);
  cv_.notify_all();
}

void Team::run(const std::vector<Op>& ops) {
  const int64_t nops = static_cast<int64_t>(ops.size());
  TORCH_CHECK(nops <= kMaxOps, "Team: a step of ", nops, " ops");
  int64_t items = 0;
  for (const Op& op : ops) items += op.n;
  const uint64_t step = step_.load() + 1;
  step_.store(step);  // a late helper stops before anything below is rewritten
  if (items > capacity_) {  // a bigger step than any before: a new array, the old one kept
    capacity_ = 2 * items;
    kept_.emplace_back(new std::atomic<uint64_t>[capacity_]);
    states_.store(kept_.back().get());
  }
  std::atomic<uint64_t>* states = states_.load();
  nops_ = nops;
  base_[0] = 0;
  for (int64_t k = 0; k < nops; ++k) {
    ops_[k] = ops[k];
    base_[k + 1] = base_[k] + ops[k].n;
    for (int r = 0; r <= helpers_; ++r) done_[r * kMaxOps + k].store(0, std::memory_order_relaxed);
  }
  for (int64_t i = 0; i < items; ++i) states[i].store(tag(step) | kFree, std::memory_order_relaxed);
  ready_.store(step);  // the helpers may start
  if (sleeping_.load() > 0) {
    std::lock_guard<std::mutex> lock(mu_);
    cv_.notify_all();
  }
  execute(step, 0);
}

void Team::execute(uint64_t step, int r) {
  const uint64_t t = tag(step);
  const int64_t nops = nops_, threads = helpers_ + 1;
  for (int64_t k = 0; k < nops; ++k) {
    const int64_t base = base_[k];
    const Op op = ops_[k];
    std::atomic<uint64_t>* st = states_.load() + base;
    if (step_.load() != step) return;  // a newer step: what was copied may be torn
    // this thread's share first (its items' states stay in its core's cache), then the others'
    int64_t mine = 0;
    const auto t0 = Clock::now();
    const int64_t start = op.n * r / threads;
    for (int64_t j = 0; j < op.n; ++j) {
      const int64_t i = start + j < op.n ? start + j : start + j - op.n;
      uint64_t expected = t | kFree;
      if (st[i].load(std::memory_order_relaxed) != expected ||
          !st[i].compare_exchange_strong(expected, t | kClaimed))
        continue;
      maybe_stall(r);
      Commit c(&st[i], t, false);
      op.fn(op, i, c);
      if (c.committed()) {
        st[i].store(t | kDone, std::memory_order_release);
        done_[r * kMaxOps + k].fetch_add(1, std::memory_order_release);
      }
      ++mine;
    }
    const double per_item =
        mine ? std::chrono::duration<double>(Clock::now() - t0).count() / mine : 0.0;
    const double grace = mine ? std::max(kMinGrace, 4 * per_item) : kNoItemGrace;
    if (!wait_done(k, op, st, step, grace)) return;
  }
}

int64_t Team::done_count(int64_t k) const {
  int64_t n = 0;
  for (int r = 0; r <= helpers_; ++r) n += done_[r * kMaxOps + k].load(std::memory_order_acquire);
  return n;
}

// Until op k is done; after `grace` s, its items still held are taken over. False: a newer
// step began (this thread was late).
bool Team::wait_done(int64_t k, const Op& op, std::atomic<uint64_t>* st, uint64_t step,
                     double grace) {
  const auto deadline = Clock::now() + std::chrono::duration<double>(grace);
  while (done_count(k) < op.n) {
    if (step_.load(std::memory_order_relaxed) != step) return false;
    if (Clock::now() >= deadline) {
      take_over(k, op, st, step);
      continue;
    }
    _mm_pause();
  }
  return step_.load() == step;
}

void Team::take_over(int64_t k, const Op& op, std::atomic<uint64_t>* st, uint64_t step) {
  const uint64_t t = tag(step);
  for (int64_t i = 0; i < op.n; ++i) {
    uint64_t s = st[i].load(std::memory_order_acquire);
    if (s != (t | kFree) && s != (t | kClaimed)) continue;  // done, being written, or taken
    if (!st[i].compare_exchange_strong(s, t | kTaken)) continue;
    Commit c(&st[i], t, true);
    takeovers.fetch_add(1, std::memory_order_relaxed);
    op.fn(op, i, c);
    st[i].store(t | kDone, std::memory_order_release);
    done_[k].fetch_add(1, std::memory_order_release);  // thread 0's slot: a sum is read
  }
}

void Team::helper_loop(int r) {
  uint64_t seen = 0;  // not ready_: a step posted before this thread ran is still to join
  while (!stop_.load()) {
    const uint64_t ready = ready_.load();
    if (ready == seen) {
      const auto until = Clock::now() + kSpin;
      while (ready_.load(std::memory_order_relaxed) == seen && Clock::now() < until) _mm_pause();
      if (ready_.load() != seen) continue;
      release_thread_tiles();
      std::unique_lock<std::mutex> lock(mu_);
      sleeping_.fetch_add(1);
      cv_.wait(lock, [&] { return ready_.load() != seen || stop_.load(); });
      sleeping_.fetch_sub(1);
      continue;
    }
    seen = ready;
    execute(ready, r);
  }
  release_thread_tiles();
}

Team& team_for(int threads) {
  static Team* team = nullptr;  // never freed: a helper may still hold a pointer to it
  static std::mutex mu;
  std::lock_guard<std::mutex> lock(mu);
  const int helpers = std::max(0, threads - 1);
  if (team == nullptr || team->helpers() != helpers) {
    if (team != nullptr) team->stop();
    team = new Team(helpers);
  }
  return *team;
}
