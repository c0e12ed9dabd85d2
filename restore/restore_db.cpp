#include "restore/restore_db.h"

#include <spdlog/spdlog.h>

#include "common/json_parse.h"
#include "common/json_raw.h"

namespace rpoint {

namespace {

// Stored JSON goes through the same depth-limited parser as request bodies
// (common/json_parse.h): a row written before that limit existed must not
// crash every later read. Stored documents wrap what clients sent (a point's
// source metadata holds the VM configuration), hence the extra room. What
// does not parse reads as null.
// With `raw_path`, the member there is kept as its stored text (a VM
// configuration, common/json_raw.h); an empty path keeps the whole value.
nlohmann::json ParseStoredJson(const std::string& text,
                               const std::vector<std::string_view>* raw_path = nullptr) {
  auto j = raw_path ? ParseJsonKeepingRaw(text, *raw_path, 2 * kJsonMaxDepth)
                    : ParseJson(text, 2 * kJsonMaxDepth);
  if (!j.ok()) {
    spdlog::warn("restore db: stored JSON ignored: {}", j.status().message());
    return nlohmann::json();
  }
  return std::move(j).value();
}

// Runs `fn` inside BEGIN IMMEDIATE ... COMMIT.
template <typename Fn>
Status InTxn(SqliteDb& db, Fn fn) {
  auto txn = SqliteTxn::Begin(db);
  if (!txn.ok()) return txn.status();
  Status s = fn();
  if (!s.ok()) return s;
  return txn->commit();
}

}  // namespace

Result<std::unique_ptr<RestoreDb>> RestoreDb::Open(const std::string& path) {
  auto m = MetadataDb::Open(path);
  if (!m.ok()) return m.status();
  return std::unique_ptr<RestoreDb>(new RestoreDb(std::move(m).value()));
}

// ---- VMs ----

Result<std::optional<VmRecord>> RestoreDb::get_vm(const std::string& name) {
  auto st = db().prepare("SELECT name, configuration, time_created FROM vms WHERE name = ?1");
  if (!st.ok()) return st.status();
  st->bind(1, name);
  auto row = st->step();
  if (!row.ok()) return row.status();
  if (!row.value()) return std::optional<VmRecord>();
  VmRecord vm;
  vm.name = st->column_text(0);
  const std::vector<std::string_view> whole;
  vm.configuration = ParseStoredJson(st->column_text(1), &whole);
  vm.time_created = st->column_text(2);
  auto ds = db().prepare("SELECT disk FROM vm_disks WHERE vm = ?1 ORDER BY position");
  if (!ds.ok()) return ds.status();
  ds->bind(1, name);
  for (;;) {
    auto r = ds->step();
    if (!r.ok()) return r.status();
    if (!r.value()) break;
    vm.disks.push_back(ds->column_text(0));
  }
  return std::optional<VmRecord>(std::move(vm));
}

Result<std::vector<VmRecord>> RestoreDb::list_vms() {
  std::vector<std::string> names;
  {
    auto st = db().prepare("SELECT name FROM vms ORDER BY name");
    if (!st.ok()) return st.status();
    for (;;) {
      auto r = st->step();
      if (!r.ok()) return r.status();
      if (!r.value()) break;
      names.push_back(st->column_text(0));
    }
  }
  std::vector<VmRecord> out;
  for (const auto& n : names) {
    auto vm = get_vm(n);
    if (!vm.ok()) return vm.status();
    if (vm.value()) out.push_back(std::move(*vm.value()));
  }
  return out;
}

Status RestoreDb::put_vm(const VmRecord& vm) {
  return InTxn(db(), [&]() -> Status {
    auto up = db().prepare(
        "INSERT INTO vms (name, configuration, time_created) VALUES (?1, ?2, ?3) "
        "ON CONFLICT(name) DO UPDATE SET configuration = excluded.configuration");
    if (!up.ok()) return up.status();
    Status s =
        up->bind(1, vm.name).bind(2, DumpJson(vm.configuration)).bind(3, vm.time_created).run();
    if (!s.ok()) return s;
    auto del = db().prepare("DELETE FROM vm_disks WHERE vm = ?1");
    if (!del.ok()) return del.status();
    s = del->bind(1, vm.name).run();
    if (!s.ok()) return s;
    for (size_t i = 0; i < vm.disks.size(); ++i) {
      auto ins = db().prepare("INSERT INTO vm_disks (vm, disk, position) VALUES (?1, ?2, ?3)");
      if (!ins.ok()) return ins.status();
      s = ins->bind(1, vm.name).bind(2, vm.disks[i]).bind(3, static_cast<int64_t>(i)).run();
      if (!s.ok()) return s;
    }
    return Status::Ok();
  });
}

Status RestoreDb::delete_vm(const std::string& name) {
  auto st = db().prepare("DELETE FROM vms WHERE name = ?1");  // vm_disks cascade
  if (!st.ok()) return st.status();
  Status s = st->bind(1, name).run();
  if (!s.ok()) return s;
  if (st->changes() == 0) return Status::NotFound("VM '" + name + "' not found");
  return Status::Ok();
}

Result<std::optional<std::string>> RestoreDb::vm_of_disk(const std::string& disk) {
  auto st = db().prepare("SELECT vm FROM vm_disks WHERE disk = ?1");
  if (!st.ok()) return st.status();
  st->bind(1, disk);
  auto r = st->step();
  if (!r.ok()) return r.status();
  if (!r.value()) return std::optional<std::string>();
  return std::optional<std::string>(st->column_text(0));
}

// ---- collections ----

namespace {
constexpr const char* kCollectionCols =
    "SELECT name, source_vm, region, time_created FROM collections ";

CollectionRecord CollectionFrom(const SqliteStmt& st) {
  CollectionRecord c;
  c.name = st.column_text(0);
  c.source_vm = st.column_text(1);
  c.region = st.column_text(2);
  c.time_created = st.column_text(3);
  return c;
}
}  // namespace

Result<std::optional<CollectionRecord>> RestoreDb::get_collection(const std::string& name) {
  auto st = db().prepare(std::string(kCollectionCols) + "WHERE name = ?1");
  if (!st.ok()) return st.status();
  st->bind(1, name);
  auto r = st->step();
  if (!r.ok()) return r.status();
  if (!r.value()) return std::optional<CollectionRecord>();
  return std::optional<CollectionRecord>(CollectionFrom(*st));
}

Result<std::vector<CollectionRecord>> RestoreDb::list_collections() {
  auto st = db().prepare(std::string(kCollectionCols) + "ORDER BY name");
  if (!st.ok()) return st.status();
  std::vector<CollectionRecord> out;
  for (;;) {
    auto r = st->step();
    if (!r.ok()) return r.status();
    if (!r.value()) break;
    out.push_back(CollectionFrom(*st));
  }
  return out;
}

Status RestoreDb::insert_collection(const CollectionRecord& c) {
  auto st = db().prepare(
      "INSERT INTO collections (name, source_vm, region, time_created) VALUES (?1, ?2, ?3, ?4)");
  if (!st.ok()) return st.status();
  return st->bind(1, c.name).bind(2, c.source_vm).bind(3, c.region).bind(4, c.time_created).run();
}

Status RestoreDb::delete_collection(const std::string& name) {
  return InTxn(db(), [&]() -> Status {
    auto b = db().prepare("DELETE FROM tracking_bases WHERE collection = ?1");
    if (!b.ok()) return b.status();
    Status s = b->bind(1, name).run();
    if (!s.ok()) return s;
    auto st = db().prepare("DELETE FROM collections WHERE name = ?1");
    if (!st.ok()) return st.status();
    s = st->bind(1, name).run();
    if (!s.ok()) return s;
    if (st->changes() == 0) return Status::NotFound("collection '" + name + "' not found");
    return Status::Ok();
  });
}

// ---- restore points ----

namespace {
constexpr const char* kPointCols =
    "SELECT collection, name, consistency_mode, exclude_disks, provisioning_state, time_created, "
    "source_metadata, operation_id, cut_pause_ns, error_code, error_message, "
    "source_restore_point FROM restore_points ";

RestorePointRecord PointFrom(const SqliteStmt& st) {
  RestorePointRecord p;
  p.collection = st.column_text(0);
  p.name = st.column_text(1);
  p.consistency_mode = st.column_text(2);
  auto ex = ParseStoredJson(st.column_text(3));
  if (ex.is_array()) {
    for (const auto& e : ex) {
      if (e.is_string()) p.exclude_disks.push_back(e.get<std::string>());
    }
  }
  p.provisioning_state = st.column_text(4);
  p.time_created = st.column_text(5);
  const std::vector<std::string_view> configuration = {"configuration"};
  p.source_metadata = ParseStoredJson(st.column_text(6), &configuration);
  p.operation_id = st.column_text(7);
  p.cut_pause_ns = st.column_int(8);
  p.error_code = st.column_text(9);
  p.error_message = st.column_text(10);
  p.source_restore_point = st.column_text(11);
  return p;
}
}  // namespace

Result<std::vector<DiskRestorePointRecord>> RestoreDb::disk_points(const std::string& collection,
                                                                   const std::string& point) {
  auto st = db().prepare(
      "SELECT disk, size_bytes, granularity, full, status, blocks_to_copy, blocks_copied, "
      "bytes_stored, store_point, parent_store_point FROM disk_restore_points "
      "WHERE collection = ?1 AND restore_point = ?2 ORDER BY position");
  if (!st.ok()) return st.status();
  st->bind(1, collection).bind(2, point);
  std::vector<DiskRestorePointRecord> out;
  for (;;) {
    auto r = st->step();
    if (!r.ok()) return r.status();
    if (!r.value()) break;
    DiskRestorePointRecord d;
    d.disk = st->column_text(0);
    d.size_bytes = static_cast<uint64_t>(st->column_int(1));
    d.granularity = static_cast<uint32_t>(st->column_int(2));
    d.full = st->column_int(3) != 0;
    d.status = st->column_text(4);
    d.blocks_to_copy = static_cast<uint64_t>(st->column_int(5));
    d.blocks_copied = static_cast<uint64_t>(st->column_int(6));
    d.bytes_stored = static_cast<uint64_t>(st->column_int(7));
    d.store_point = static_cast<uint64_t>(st->column_int(8));
    d.parent_store_point = static_cast<uint64_t>(st->column_int(9));
    d.completion_percent =
        d.status == "Succeeded"
            ? 100
            : (d.blocks_to_copy ? static_cast<int>(d.blocks_copied * 100 / d.blocks_to_copy) : 0);
    out.push_back(std::move(d));
  }
  return out;
}

Result<std::optional<RestorePointRecord>> RestoreDb::get_point(const std::string& collection,
                                                               const std::string& name) {
  auto st = db().prepare(std::string(kPointCols) + "WHERE collection = ?1 AND name = ?2");
  if (!st.ok()) return st.status();
  st->bind(1, collection).bind(2, name);
  auto r = st->step();
  if (!r.ok()) return r.status();
  if (!r.value()) return std::optional<RestorePointRecord>();
  RestorePointRecord p = PointFrom(*st);
  auto d = disk_points(collection, name);
  if (!d.ok()) return d.status();
  p.disk_restore_points = std::move(d).value();
  return std::optional<RestorePointRecord>(std::move(p));
}

Result<std::vector<RestorePointRecord>> RestoreDb::list_points(const std::string& collection) {
  std::vector<RestorePointRecord> out;
  {
    auto st = collection.empty()
                  ? db().prepare(std::string(kPointCols) + "ORDER BY seq")
                  : db().prepare(std::string(kPointCols) + "WHERE collection = ?1 ORDER BY seq");
    if (!st.ok()) return st.status();
    if (!collection.empty()) st->bind(1, collection);
    for (;;) {
      auto r = st->step();
      if (!r.ok()) return r.status();
      if (!r.value()) break;
      out.push_back(PointFrom(*st));
    }
  }
  for (auto& p : out) {
    auto d = disk_points(p.collection, p.name);
    if (!d.ok()) return d.status();
    p.disk_restore_points = std::move(d).value();
  }
  return out;
}

Status RestoreDb::save_point(const RestorePointRecord& p, const OperationRecord* op,
                             const std::vector<TrackingBase>* bases) {
  return InTxn(db(), [&]() -> Status {
    nlohmann::json ex = p.exclude_disks;
    auto up = db().prepare(
        "INSERT INTO restore_points (collection, name, seq, consistency_mode, exclude_disks, "
        "provisioning_state, time_created, source_metadata, operation_id, cut_pause_ns, "
        "error_code, error_message, source_restore_point) VALUES (?1, ?2, "
        "(SELECT COALESCE(MAX(seq), 0) + 1 FROM restore_points), ?3, ?4, ?5, ?6, ?7, ?8, ?9, "
        "?10, ?11, ?12) "
        "ON CONFLICT(collection, name) DO UPDATE SET consistency_mode = excluded.consistency_mode, "
        "exclude_disks = excluded.exclude_disks, provisioning_state = excluded.provisioning_state, "
        "time_created = excluded.time_created, source_metadata = excluded.source_metadata, "
        "operation_id = excluded.operation_id, cut_pause_ns = excluded.cut_pause_ns, "
        "error_code = excluded.error_code, error_message = excluded.error_message, "
        "source_restore_point = excluded.source_restore_point");
    if (!up.ok()) return up.status();
    Status s = up->bind(1, p.collection)
                   .bind(2, p.name)
                   .bind(3, p.consistency_mode)
                   .bind(4, ex.dump())
                   .bind(5, p.provisioning_state)
                   .bind(6, p.time_created)
                   .bind(7, DumpJson(p.source_metadata))
                   .bind(8, p.operation_id)
                   .bind(9, p.cut_pause_ns)
                   .bind(10, p.error_code)
                   .bind(11, p.error_message)
                   .bind(12, p.source_restore_point)
                   .run();
    if (!s.ok()) return s;
    auto del = db().prepare(
        "DELETE FROM disk_restore_points WHERE collection = ?1 AND restore_point = ?2");
    if (!del.ok()) return del.status();
    s = del->bind(1, p.collection).bind(2, p.name).run();
    if (!s.ok()) return s;
    for (size_t i = 0; i < p.disk_restore_points.size(); ++i) {
      const auto& d = p.disk_restore_points[i];
      auto ins = db().prepare(
          "INSERT INTO disk_restore_points (collection, restore_point, disk, position, size_bytes, "
          "granularity, full, status, blocks_to_copy, blocks_copied, bytes_stored, store_point, "
          "parent_store_point) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)");
      if (!ins.ok()) return ins.status();
      s = ins->bind(1, p.collection)
              .bind(2, p.name)
              .bind(3, d.disk)
              .bind(4, static_cast<int64_t>(i))
              .bind(5, static_cast<int64_t>(d.size_bytes))
              .bind(6, int64_t{d.granularity})
              .bind(7, int64_t{d.full})
              .bind(8, d.status)
              .bind(9, static_cast<int64_t>(d.blocks_to_copy))
              .bind(10, static_cast<int64_t>(d.blocks_copied))
              .bind(11, static_cast<int64_t>(d.bytes_stored))
              .bind(12, static_cast<int64_t>(d.store_point))
              .bind(13, static_cast<int64_t>(d.parent_store_point))
              .run();
      if (!s.ok()) return s;
    }
    if (op) {
      s = save_operation_locked(*op);
      if (!s.ok()) return s;
    }
    if (bases) {
      for (const auto& b : *bases) {
        auto ins = db().prepare(
            "INSERT INTO tracking_bases (disk, collection, restore_point, store_point, "
            "granularity, generation, tracker_id) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) "
            "ON CONFLICT(disk, collection) DO UPDATE SET "
            "restore_point = excluded.restore_point, store_point = excluded.store_point, "
            "granularity = excluded.granularity, generation = excluded.generation, "
            "tracker_id = excluded.tracker_id, retained = 0");
        if (!ins.ok()) return ins.status();
        s = ins->bind(1, b.disk)
                .bind(2, b.collection)
                .bind(3, b.restore_point)
                .bind(4, static_cast<int64_t>(b.store_point))
                .bind(5, int64_t{b.granularity})
                .bind(6, static_cast<int64_t>(b.generation))
                .bind(7, static_cast<int64_t>(b.tracker_id))
                .run();
        if (!s.ok()) return s;
      }
    }
    return Status::Ok();
  });
}

Status RestoreDb::delete_point(const std::string& collection, const std::string& name) {
  auto st = db().prepare("DELETE FROM restore_points WHERE collection = ?1 AND name = ?2");
  if (!st.ok()) return st.status();
  return st->bind(1, collection).bind(2, name).run();  // disk points cascade
}

Result<std::vector<TrackingBase>> RestoreDb::mark_point_deleting(const std::string& collection,
                                                                 const std::string& name) {
  Status s = InTxn(db(), [&]() -> Status {
    auto up = db().prepare(
        "UPDATE restore_points SET provisioning_state = 'Deleting' "
        "WHERE collection = ?1 AND name = ?2");
    if (!up.ok()) return up.status();
    Status s = up->bind(1, collection).bind(2, name).run();
    if (!s.ok()) return s;
    // Only a base that is still this point's own disk point, for a disk the
    // collection's VM still has: anything else will never be a parent again.
    auto keep = db().prepare(
        "UPDATE tracking_bases SET retained = 1 WHERE collection = ?1 AND restore_point = ?2 "
        "AND disk IN (SELECT disk FROM vm_disks WHERE vm = "
        "(SELECT source_vm FROM collections WHERE name = ?1)) "
        "AND store_point IN (SELECT store_point FROM disk_restore_points "
        "WHERE collection = ?1 AND restore_point = ?2 AND disk = tracking_bases.disk "
        "AND status = 'Succeeded' AND store_point != 0)");
    if (!keep.ok()) return keep.status();
    return keep->bind(1, collection).bind(2, name).run();
  });
  if (!s.ok()) return s;
  auto all = retained_bases();
  if (!all.ok()) return all.status();
  std::vector<TrackingBase> out;
  for (auto& b : all.value()) {
    if (b.collection == collection && b.restore_point == name) out.push_back(std::move(b));
  }
  return out;
}

namespace {
constexpr const char* kBaseCols =
    "SELECT disk, collection, restore_point, store_point, granularity, retained, generation, "
    "tracker_id FROM tracking_bases ";

TrackingBase BaseFrom(const SqliteStmt& st) {
  TrackingBase b;
  b.disk = st.column_text(0);
  b.collection = st.column_text(1);
  b.restore_point = st.column_text(2);
  b.store_point = static_cast<uint64_t>(st.column_int(3));
  b.granularity = static_cast<uint32_t>(st.column_int(4));
  b.retained = st.column_int(5) != 0;
  b.generation = static_cast<uint64_t>(st.column_int(6));
  b.tracker_id = static_cast<uint64_t>(st.column_int(7));
  return b;
}
}  // namespace

Result<std::optional<TrackingBase>> RestoreDb::tracking_base(const std::string& disk,
                                                             const std::string& collection) {
  auto st = db().prepare(std::string(kBaseCols) + "WHERE disk = ?1 AND collection = ?2");
  if (!st.ok()) return st.status();
  st->bind(1, disk).bind(2, collection);
  auto r = st->step();
  if (!r.ok()) return r.status();
  if (!r.value()) return std::optional<TrackingBase>();
  return std::optional<TrackingBase>(BaseFrom(*st));
}

Result<std::vector<TrackingBase>> RestoreDb::bases_of_disk(const std::string& disk) {
  auto st = db().prepare(std::string(kBaseCols) + "WHERE disk = ?1 ORDER BY collection");
  if (!st.ok()) return st.status();
  st->bind(1, disk);
  std::vector<TrackingBase> out;
  for (;;) {
    auto r = st->step();
    if (!r.ok()) return r.status();
    if (!r.value()) break;
    out.push_back(BaseFrom(*st));
  }
  return out;
}

Status RestoreDb::drop_stale_bases() {
  auto st = db().prepare(
      "DELETE FROM tracking_bases WHERE retained = 0 AND NOT EXISTS (SELECT 1 FROM vm_disks v "
      "JOIN collections c ON c.source_vm = v.vm WHERE v.disk = tracking_bases.disk "
      "AND c.name = tracking_bases.collection)");
  if (!st.ok()) return st.status();
  return st->run();
}

Result<std::vector<TrackingBase>> RestoreDb::retained_bases() {
  auto st = db().prepare(std::string(kBaseCols) + "WHERE retained = 1 ORDER BY disk");
  if (!st.ok()) return st.status();
  std::vector<TrackingBase> out;
  for (;;) {
    auto r = st->step();
    if (!r.ok()) return r.status();
    if (!r.value()) break;
    out.push_back(BaseFrom(*st));
  }
  return out;
}

Status RestoreDb::drop_retained_base(const std::string& disk, uint64_t store_point) {
  auto st = db().prepare(
      "DELETE FROM tracking_bases WHERE disk = ?1 AND store_point = ?2 AND retained = 1");
  if (!st.ok()) return st.status();
  return st->bind(1, disk).bind(2, static_cast<int64_t>(store_point)).run();
}

// ---- operations ----

namespace {

constexpr const char* kOperationColumns =
    "SELECT id, kind, resource_id, status, percent_complete, start_time, end_time, error_code, "
    "error_message, result FROM operations ";

OperationRecord OperationFromRow(const SqliteStmt& st) {
  OperationRecord o;
  o.id = st.column_text(0);
  o.kind = st.column_text(1);
  o.resource_id = st.column_text(2);
  o.status = st.column_text(3);
  o.percent_complete = static_cast<int>(st.column_int(4));
  o.start_time = st.column_text(5);
  o.end_time = st.column_text(6);
  o.error_code = st.column_text(7);
  o.error_message = st.column_text(8);
  o.result = ParseStoredJson(st.column_text(9));
  return o;
}

}  // namespace

Result<std::optional<OperationRecord>> RestoreDb::get_operation(const std::string& id) {
  auto st = db().prepare(std::string(kOperationColumns) + "WHERE id = ?1");
  if (!st.ok()) return st.status();
  st->bind(1, id);
  auto r = st->step();
  if (!r.ok()) return r.status();
  if (!r.value()) return std::optional<OperationRecord>();
  return std::optional<OperationRecord>(OperationFromRow(st.value()));
}

Result<std::vector<OperationRecord>> RestoreDb::list_operations() {
  auto st = db().prepare(std::string(kOperationColumns) + "ORDER BY start_time DESC, id");
  if (!st.ok()) return st.status();
  std::vector<OperationRecord> out;
  for (;;) {
    auto r = st->step();
    if (!r.ok()) return r.status();
    if (!r.value()) break;
    out.push_back(OperationFromRow(st.value()));
  }
  return out;
}

Result<int64_t> RestoreDb::prune_operations(const std::string& ended_before, unsigned keep_count) {
  auto st = db().prepare(
      "DELETE FROM operations WHERE status != 'InProgress' AND (end_time < ?1 OR id IN "
      "(SELECT id FROM operations WHERE status != 'InProgress' ORDER BY end_time DESC, id "
      "LIMIT -1 OFFSET ?2))");
  if (!st.ok()) return st.status();
  Status s = st->bind(1, ended_before).bind(2, int64_t{keep_count}).run();
  if (!s.ok()) return s;
  return int64_t{st->changes()};
}

Status RestoreDb::save_operation_locked(const OperationRecord& o) {
  auto st = db().prepare(
      "INSERT INTO operations (id, kind, resource_id, status, percent_complete, start_time, "
      "end_time, error_code, error_message, result) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, "
      "?10) ON CONFLICT(id) DO UPDATE SET status = excluded.status, "
      "percent_complete = excluded.percent_complete, end_time = excluded.end_time, "
      "error_code = excluded.error_code, error_message = excluded.error_message, "
      "result = excluded.result");
  if (!st.ok()) return st.status();
  return st->bind(1, o.id)
      .bind(2, o.kind)
      .bind(3, o.resource_id)
      .bind(4, o.status)
      .bind(5, int64_t{o.percent_complete})
      .bind(6, o.start_time)
      .bind(7, o.end_time)
      .bind(8, o.error_code)
      .bind(9, o.error_message)
      .bind(10, o.result.dump())
      .run();
}

Status RestoreDb::save_operation(const OperationRecord& op) {
  return save_operation_locked(op);
}

Status RestoreDb::fail_in_progress_operations(const std::string& message,
                                              const std::string& end_time,
                                              const std::set<std::string>& keep) {
  nlohmann::json ids = nlohmann::json::array();
  for (const auto& id : keep) ids.push_back(id);
  auto st = db().prepare(
      "UPDATE operations SET status = 'Failed', end_time = ?2, error_code = 'Interrupted', "
      "error_message = ?1 WHERE status = 'InProgress' AND id NOT IN (SELECT value FROM "
      "json_each(?3))");
  if (!st.ok()) return st.status();
  return st->bind(1, message).bind(2, end_time).bind(3, ids.dump()).run();
}

}  // namespace rpoint
