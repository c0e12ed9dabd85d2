// Services: a real DiskService and RestoreService (one local region) on a fresh
// temporary directory, for the tests of what sits on top of them (routes,
// the control server). Removes the directory when destroyed.
#pragma once

#include <doctest/doctest.h>
#include <stdlib.h>

#include <filesystem>
#include <memory>
#include <string>

#include "disks/disk_service.h"
#include "restore/restore_service.h"

namespace rpoint {

struct Services {
  std::string dir;
  std::unique_ptr<DiskService> svc;
  std::unique_ptr<RestoreService> restore;

  // tmp_template: mkdtemp pattern, e.g. "/tmp/rpoint-http-XXXXXX".
  explicit Services(std::string tmp_template) {
    REQUIRE(mkdtemp(tmp_template.data()) != nullptr);
    dir = tmp_template;
    auto s = DiskService::Open(
        {dir + "/disks", dir + "/metadata.db", false, dir + "/tracking", {}, {"/"}});
    REQUIRE(s.ok());
    svc = std::move(s).value();
    std::filesystem::create_directories(dir + "/regions");
    RestoreServiceOptions ro;
    ro.regions = {{"local", dir + "/regions/local", true}};
    ro.metadata_db = dir + "/metadata.db";
    ro.tracking_dir = dir + "/tracking";
    ro.staging_dir = dir + "/staging";
    auto r = RestoreService::Open(ro, *svc);
    REQUIRE_MESSAGE(r.ok(), r.status().ToString());
    restore = std::move(r).value();
  }
  ~Services() {
    restore->shutdown();
    restore.reset();
    svc.reset();
    std::filesystem::remove_all(dir);
  }
  Services(const Services&) = delete;
  Services& operator=(const Services&) = delete;
};

}  // namespace rpoint
