#include "disks/metadata_db.h"

#include "db/migrations.h"

namespace rpoint {

int MetadataDb::LatestSchemaVersion() {
  return db::MetadataSchema().latest();
}

Result<std::unique_ptr<MetadataDb>> MetadataDb::Open(const std::string& path) {
  auto db = SqliteDb::Open(path);
  if (!db.ok()) return db.status();
  std::unique_ptr<MetadataDb> m(new MetadataDb(std::move(db).value()));
  // WAL: readers never block the writer; FULL: the WAL is fsynced at every
  // commit, so an acknowledged change survives a power cut (NORMAL would not).
  Status s = m->db_->exec("PRAGMA journal_mode=WAL");
  if (s.ok()) s = m->db_->exec("PRAGMA synchronous=FULL");
  // Foreign keys on only after migrating: rebuilding a referenced table
  // (migration 5) must not cascade or check half-way.
  if (s.ok()) s = db::Migrate(*m->db_, db::MetadataSchema());
  if (s.ok()) s = m->db_->exec("PRAGMA foreign_keys=ON");
  if (!s.ok()) return s;
  return m;
}

Result<int> MetadataDb::schema_version() {
  return db::SchemaVersion(*db_, db::MetadataSchema());
}

Result<std::vector<DiskRow>> MetadataDb::list_disks() {
  auto st = db_->prepare(
      "SELECT name, path, size_bytes, adopted, block_device, kind, time_created, "
      "tracking_granularity, provisioning_state, source_resource_id, export_mode, ublk_dev_id "
      "FROM disks ORDER BY name");
  if (!st.ok()) return st.status();
  std::vector<DiskRow> out;
  for (;;) {
    auto row = st->step();
    if (!row.ok()) return row.status();
    if (!row.value()) break;
    DiskRow r;
    r.name = st->column_text(0);
    r.path = st->column_text(1);
    r.size_bytes = static_cast<uint64_t>(st->column_int(2));
    r.adopted = st->column_int(3) != 0;
    r.block_device = st->column_int(4) != 0;
    r.kind = st->column_text(5);
    r.time_created = st->column_text(6);
    r.tracking_granularity = static_cast<uint32_t>(st->column_int(7));
    r.provisioning_state = st->column_text(8);
    r.source_resource_id = st->column_text(9);
    r.export_mode = st->column_text(10);
    r.ublk_dev_id = static_cast<int>(st->column_int(11));
    out.push_back(std::move(r));
  }
  return out;
}

Status MetadataDb::insert_disk(const DiskRow& r) {
  auto st = db_->prepare(
      "INSERT INTO disks (name, path, size_bytes, adopted, block_device, kind, time_created, "
      "tracking_granularity, provisioning_state, source_resource_id, export_mode, ublk_dev_id) "
      "VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)");
  if (!st.ok()) return st.status();
  // One statement is its own transaction; with synchronous=FULL it is durable on return.
  return st->bind(1, r.name)
      .bind(2, r.path)
      .bind(3, static_cast<int64_t>(r.size_bytes))
      .bind(4, int64_t{r.adopted})
      .bind(5, int64_t{r.block_device})
      .bind(6, r.kind)
      .bind(7, r.time_created)
      .bind(8, int64_t{r.tracking_granularity})
      .bind(9, r.provisioning_state)
      .bind(10, r.source_resource_id)
      .bind(11, r.export_mode)
      .bind(12, int64_t{r.ublk_dev_id})
      .run();
}

Status MetadataDb::update_disk_provisioning(const std::string& name, const std::string& state) {
  auto st = db_->prepare("UPDATE disks SET provisioning_state = ?2 WHERE name = ?1");
  if (!st.ok()) return st.status();
  Status s = st->bind(1, name).bind(2, state).run();
  if (!s.ok()) return s;
  if (st->changes() == 0) return Status::NotFound("no disk named '" + name + "'");
  return Status::Ok();
}

Status MetadataDb::update_disk_export(const std::string& name, const std::string& export_mode,
                                      int ublk_dev_id) {
  auto st = db_->prepare("UPDATE disks SET export_mode = ?2, ublk_dev_id = ?3 WHERE name = ?1");
  if (!st.ok()) return st.status();
  Status s = st->bind(1, name).bind(2, export_mode).bind(3, int64_t{ublk_dev_id}).run();
  if (!s.ok()) return s;
  if (st->changes() == 0) return Status::NotFound("no disk named '" + name + "'");
  return Status::Ok();
}

Status MetadataDb::update_disk_size(const std::string& name, uint64_t size_bytes) {
  auto st = db_->prepare("UPDATE disks SET size_bytes = ?2 WHERE name = ?1");
  if (!st.ok()) return st.status();
  Status s = st->bind(1, name).bind(2, static_cast<int64_t>(size_bytes)).run();
  if (!s.ok()) return s;
  if (st->changes() == 0) return Status::NotFound("no disk named '" + name + "'");
  return Status::Ok();
}

Status MetadataDb::delete_disk(const std::string& name) {
  auto st = db_->prepare("DELETE FROM disks WHERE name = ?1");
  if (!st.ok()) return st.status();
  Status s = st->bind(1, name).run();
  if (!s.ok()) return s;
  if (st->changes() == 0) return Status::NotFound("no disk named '" + name + "'");
  return Status::Ok();
}

}  // namespace rpoint
