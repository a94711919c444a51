// Threads for the fused decode (decode_layers.cpp) that do not wait for a preempted thread.
//
// With OpenMP's parallel loops each thread gets its share of an op up front and every op
// ends in a barrier: when the OS preempts one thread (a router, an HTTP client, Ray on the
// same cores), the other waits at the barrier for as long.
//
// Here every thread (the caller and its helpers) runs the whole step's program: its ops in
// order, each a set of items claimed one at a time. An item's result is computed into the
// thread's scratch and committed (written to the op's outputs) only by the thread that still
// holds it. A thread out of items waits a short grace for the op's last items; then it takes
// over any still held (its holder preempted) and runs them itself, and goes on to the next op.
// A thread that comes back finds its item taken, drops its result and catches up. So no op
// waits for a preempted thread, the caller included. Which thread runs an item never changes
// its values: the results are the same bit for bit.
//
// Item states carry the step's number: a late thread never commits into a newer step.
#pragma once
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

struct Op;

// An item's state, in its low 3 bits; the step's number above them.
enum ItemState : uint64_t { kFree = 0, kClaimed = 1, kTaken = 2, kCommitting = 3, kDone = 4 };

// Handed to an item: commit() says whether this thread may write the item's outputs now.
class Commit {
 public:
  Commit(std::atomic<uint64_t>* state, uint64_t tag, bool taken)
      : state_(state), tag_(tag), committed_(taken) {}
  bool commit();
  bool committed() const { return committed_; }

 private:
  std::atomic<uint64_t>* state_;
  uint64_t tag_;
  bool committed_;
};

// What an op is: a plain struct a helper can copy (and check it copied whole).
struct Op {
  void (*fn)(const Op&, int64_t item, Commit& commit) = nullptr;
  int64_t n = 0;          // items
  const void* in[6] = {};  // the op's inputs and outputs, by kind
  void* out[4] = {};
  int64_t v[8] = {};
  float f = 0.f;
};

class Team {
 public:
  static constexpr int64_t kMaxOps = 4096;  // a step's
  static constexpr int kMaxThreads = 16;
  explicit Team(int helpers);
  // A step's ops in order, on the calling thread and the helpers; returns when all are done.
  void run(const std::vector<Op>& ops);
  void stop();  // the helpers exit (they are detached)
  int helpers() const { return helpers_; }

 private:
  static uint64_t tag(uint64_t step) { return step << 3; }
  void helper_loop(int r);
  void execute(uint64_t step, int r);  // every op of the step, in order, as thread r
  int64_t done_count(int64_t k) const;
  bool wait_done(int64_t k, const Op& op, std::atomic<uint64_t>* st, uint64_t step,
                 double grace);
  void take_over(int64_t k, const Op& op, std::atomic<uint64_t>* st, uint64_t step);

  const int helpers_;
  std::atomic<uint64_t> step_{0};   // moved on before the program is rewritten
  std::atomic<uint64_t> ready_{0};  // the step whose program is written
  int64_t nops_ = 0;
  std::unique_ptr<Op[]> ops_;
  std::unique_ptr<int64_t[]> base_;  // op k's items are states_[base_[k] ...]
  // items done [thread][op]: a thread's counts share no cache line with another's
  std::unique_ptr<std::atomic<int64_t>[]> done_;
  // item states, grown for a bigger step; an outgrown array is kept (a late thread may hold it)
  std::atomic<std::atomic<uint64_t>*> states_{nullptr};
  int64_t capacity_ = 0;
  std::vector<std::unique_ptr<std::atomic<uint64_t>[]>> kept_;
  std::atomic<bool> stop_{false};
  std::atomic<int> sleeping_{0};
  std::mutex mu_;
  std::condition_variable cv_;
};

// The process's team for `threads` threads in all (the caller and threads - 1 helpers).
Team& team_for(int threads);
void release_thread_tiles();  // decode_layers.cpp: this thread's AMX tiles, when it is idle
int64_t team_takeovers();     // items taken over from another thread, since the process began
// Tests: thread `thread` (0: the caller) sleeps `micros` holding every `every`-th item it
// claims (every = 0: never), so that the others take its items over.
void team_debug_stall(int64_t thread, int64_t every, int64_t micros);
