// Private to the PostgreSQL store: its shared queue (shared_queue.hpp),
// used when the store opens in shared mode (PostgresStoreOptions::shared).
#pragma once

#include <cstdint>
#include <deque>
#include <memory>
#include <set>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "../sync.hpp"
#include "postgres_internal.hpp"
#include "store/shared_queue.hpp"

namespace taskmgr::detail::postgres {

class PostgresShared final : public SharedQueue {
 public:
  struct Settings {
    std::string url;    // may hold a password: never shown
    std::string setup;  // session_setup()
    int connect_timeout_seconds = 10;
    std::string where;   // describe()
    std::string schema;  // the schema the tables are in
    store::TaskLayout layout;
    ClusterOptions cluster;
  };

  // Registers this host (task_hosts). Throws PgError or Error.
  explicit PostgresShared(Settings s);
  ~PostgresShared() override;

  const std::string& host_id() const override { return host_id_; }
  const ClusterOptions& cluster_options() const override { return s_.cluster; }
  std::vector<ClaimedTask> claim(const ClaimRequest& r) override REQUIRES(!work_mu_, !claims_mu_);
  bool confirm(const std::string& id) override REQUIRES(!work_mu_, !claims_mu_);
  void release(const std::vector<std::string>& ids) override REQUIRES(!work_mu_, !claims_mu_);
  std::int64_t fence_of(const std::string& id) const override REQUIRES(!claims_mu_);
  void forget(const std::string& id) override REQUIRES(!claims_mu_);
  HeartbeatAnswer heartbeat(const std::string& report_json, const RescueFn& rescue,
                            std::optional<Timestamp> queued_before) override
      REQUIRES(!beat_mu_, !claims_mu_, !work_mu_);
  SharedChange change_unclaimed(const std::string& id, const ChangeFn& change) override
      REQUIRES(!work_mu_);
  bool request_cancel(const std::string& id) override REQUIRES(!work_mu_);
  bool wait_for_work(double seconds) override REQUIRES(!listen_mu_);
  void wake() override;
  void notify_work() override REQUIRES(!work_mu_);
  ClusterStatus cluster() override REQUIRES(!work_mu_);
  std::uint64_t lost_claims() const override REQUIRES(!claims_mu_);
  std::vector<std::string> take_lost() override REQUIRES(!claims_mu_);
  bool take_refused(const std::string& id) override REQUIRES(!claims_mu_);
  void close_host() override REQUIRES(!work_mu_);

  // The store's writer found a write of `id` refused by its fence.
  void write_refused(const std::string& id, std::int64_t token) REQUIRES(!claims_mu_);
  // The channel notifications go to (a write that queues tasks sends one).
  const std::string& channel() const { return channel_; }

  // The column after a task's select list: claimed_by, or a claim's token.
  static constexpr int kClaimColumn = store::kFieldCount;

 private:
  std::unique_ptr<pg::Conn> connect() const;
  std::string lease_interval() const;
  std::string rescue_statement() const;
  std::size_t rescue_expired(const RescueFn& rescue, std::optional<Timestamp> queued_before)
      REQUIRES(beat_mu_);
  void lost(const std::string& id, std::int64_t token) REQUIRES(!claims_mu_);
  // Runs f(conn) on `c` (connected again when broken), tried again after a
  // lost connection or a conflict; throws Error naming `what`.
  template <typename F>
  auto on(std::unique_ptr<pg::Conn>& c, const char* what, F&& f);

  Settings s_;
  std::string host_id_;
  const std::string channel_;
  const int wake_fd_;

  Mutex work_mu_;  // claims, confirms, controls, the cluster view
  std::unique_ptr<pg::Conn> work_ GUARDED_BY(work_mu_);
  Mutex beat_mu_;  // heartbeats and rescues
  std::unique_ptr<pg::Conn> beat_ GUARDED_BY(beat_mu_);
  Mutex listen_mu_;  // the LISTEN connection
  std::unique_ptr<pg::Conn> listen_ GUARDED_BY(listen_mu_);

  mutable Mutex claims_mu_;
  std::unordered_map<std::string, std::int64_t> claims_ GUARDED_BY(claims_mu_);
  // Claims lost while this host may still run the task: not claimed again
  // here until the task's record has written its last update (forget).
  std::set<std::string> retired_ GUARDED_BY(claims_mu_);
  std::uint64_t lost_claims_ GUARDED_BY(claims_mu_) = 0;
  std::vector<std::string> lost_ids_ GUARDED_BY(claims_mu_);
  std::set<std::pair<std::string, std::int64_t>> counted_lost_ GUARDED_BY(claims_mu_);
  // Tasks a write of which the fence refused (take_refused), each with the
  // number of its refusal; refused_order_ holds them oldest first. At most
  // kRefusedKept: one is asked about within a commit of its refusal, and
  // those nobody asks about are dropped oldest first.
  static constexpr std::size_t kRefusedKept = 4096;
  std::unordered_map<std::string, std::uint64_t> refused_ GUARDED_BY(claims_mu_);
  std::deque<std::pair<std::string, std::uint64_t>> refused_order_ GUARDED_BY(claims_mu_);
  std::uint64_t refusals_ GUARDED_BY(claims_mu_) = 0;
};

}  // namespace taskmgr::detail::postgres
