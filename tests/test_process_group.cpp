// The ranks' store in a long-lived process: every sync and every fan-out round exchanges payloads
// through it (ProcessGroup::exchange), and a key the store holds stays until it is deleted. After
// any number of rounds the store holds one round's keys, not one per round ever run — including
// rounds that a decisive payload (a failure) ended early. Ranks are threads of this process, as
// in test_fanout.cpp; the store is counted by a client of its own.

#include <gtest/gtest.h>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include <barrier>
#include <cstdlib>
#include <thread>

#include "device_skip.h"
#include "loadkit/error.h"
#include "loadkit/runtime/distributed.h"
#include "model_checks.h"
#include "test_support.h"

namespace loadkit::test {
namespace {

constexpr int kRanks = 3;

/// `rounds` exchanges of a payload of 4 KiB; every 10th round rank 0's payload is decisive and
/// ends the others' wait early, as a rank that failed does.
void exchange_rounds(ProcessGroup& group, int rounds) {
  const std::string payload(4096, static_cast<char>('a' + group.rank()));
  const std::string failure = "fail";
  for (int i = 0; i < rounds; ++i) {
    const bool decisive_round = i % 10 == 5;
    const auto all = group.exchange(decisive_round && group.rank() == 0 ? failure : payload,
                                    [&](const std::string& p) { return p == failure; });
    ASSERT_EQ(all.size(), static_cast<size_t>(kRanks));
    if (!decisive_round)
      for (int r = 0; r < kRanks; ++r) ASSERT_EQ(all[r], std::string(4096, static_cast<char>('a' + r)));
  }
}

TEST(Exchange, TheStoreHoldsOneRoundOfKeysHoweverManyRoundsRan) {
  SKIP_WITHOUT_TP_BACKEND("cpu");
  setenv("LOADKIT_TP_TIMEOUT", "60", 1);  // a bug here fails the test, not the suite's clock
  const int port = free_port();
  // Ranks and this thread meet after the first rounds, after the keys are counted, after the
  // next rounds, and after they are counted again.
  std::barrier meet(kRanks + 1);
  std::vector<std::string> errors(kRanks);
  std::vector<std::thread> ranks;
  for (int rank = 0; rank < kRanks; ++rank)
    ranks.emplace_back([&, rank] {
      try {
        auto group = join_local_rank(rank, kRanks, port);
        exchange_rounds(*group->world(), 20);
        meet.arrive_and_wait();
        meet.arrive_and_wait();
        exchange_rounds(*group->world(), 200);
        meet.arrive_and_wait();
        meet.arrive_and_wait();
      } catch (const std::exception& e) {
        errors[rank] = e.what();
        meet.arrive_and_drop();
      }
    });
  auto count_keys = [&] {
    c10d::TCPStoreOptions options;
    options.port = static_cast<uint16_t>(port);
    options.isServer = false;
    options.waitWorkers = false;
    return c10d::TCPStore("127.0.0.1", options).getNumKeys();
  };
  meet.arrive_and_wait();
  const int64_t after_20 = count_keys();
  meet.arrive_and_wait();
  meet.arrive_and_wait();
  const int64_t after_220 = count_keys();
  meet.arrive_and_wait();
  for (auto& t : ranks) t.join();
  unsetenv("LOADKIT_TP_TIMEOUT");
  for (int r = 0; r < kRanks; ++r) EXPECT_EQ(errors[r], "") << "rank " << r;
  EXPECT_EQ(after_220, after_20) << "the store grew by " << after_220 - after_20 << " keys over 200 rounds";
}

}  // namespace
}  // namespace loadkit::test
