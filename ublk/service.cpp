#include "ublk/service.h"

#include <signal.h>
#include <spdlog/spdlog.h>
#include <unistd.h>

#include <cerrno>

namespace rpoint {

namespace {

bool ProcessAlive(int pid) {
  return pid > 0 && (::kill(pid, 0) == 0 || errno == EPERM);
}

}  // namespace

UblkService::~UblkService() {
  detach_all();
}

Status UblkService::open_locked() {
  if (ctl_) return Status::Ok();
  auto c = UblkControl::Open(opts_.control_path, opts_.timeout);
  if (!c.ok()) return c.status();
  ctl_ = std::move(c).value();
  return Status::Ok();
}

Status UblkService::available() {
  std::lock_guard<std::mutex> lock(mu_);
  return open_locked();
}

Result<int> UblkService::serve(const std::string& name, std::shared_ptr<BlockDevice> dev,
                               int dev_id) {
  std::lock_guard<std::mutex> lock(mu_);
  errors_.erase(name);
  auto fail = [&](Status s) -> Status {
    errors_[name] = s.message();
    spdlog::error("disk {}: not served over ublk: {}", name, s.message());
    return s;
  };
  if (Status s = open_locked(); !s.ok()) return fail(s);
  // Served already (a restore's end and the PUT that asked for ublk may race).
  if (auto it = devices_.find(name); it != devices_.end()) return it->second->dev_id();
  if (dev_id >= 0) {
    auto info = ctl_->get_dev_info(static_cast<uint32_t>(dev_id));
    if (info.ok()) {
      const ublksrv_ctrl_dev_info& i = info.value();
      bool ours_left = i.state == UBLK_S_DEV_QUIESCED ||
                       (i.state == UBLK_S_DEV_LIVE && !ProcessAlive(i.ublksrv_pid));
      if (ours_left && (i.flags & UBLK_F_USER_RECOVERY)) {
        auto d = UblkDevice::Recover(*ctl_, dev, i, opts_.device);
        if (!d.ok()) return fail(d.status());
        int id = d.value()->dev_id();
        devices_[name] = std::move(d).value();
        return id;
      }
      if (i.state == UBLK_S_DEV_DEAD && !ProcessAlive(i.ublksrv_pid)) {
        // Stopped but never deleted (a crash during a delete): make it anew.
        Status s = ctl_->del_dev(i.dev_id);
        if (!s.ok())
          spdlog::warn("disk {}: deleting stale ublk {}: {}", name, dev_id, s.ToString());
      } else {
        dev_id = -1;  // the number belongs to another server now
      }
    } else if (info.status().code() != Code::kNotFound) {
      return fail(info.status());
    }
  }
  auto d = UblkDevice::Add(*ctl_, dev, opts_.device, dev_id);
  if (!d.ok() && dev_id >= 0) d = UblkDevice::Add(*ctl_, dev, opts_.device, -1);  // number taken
  if (!d.ok()) return fail(d.status());
  int id = d.value()->dev_id();
  devices_[name] = std::move(d).value();
  return id;
}

Status UblkService::remove(const std::string& name) {
  std::unique_ptr<UblkDevice> d;
  {
    std::lock_guard<std::mutex> lock(mu_);
    errors_.erase(name);
    auto it = devices_.find(name);
    if (it == devices_.end()) return Status::Ok();
    d = std::move(it->second);
    devices_.erase(it);
  }
  return d->remove();
}

Status UblkService::check_idle(const std::string& name) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = devices_.find(name);
  if (it == devices_.end()) return Status::Ok();
  return it->second->check_idle();
}

LocalExport::State UblkService::state(const std::string& name) {
  std::lock_guard<std::mutex> lock(mu_);
  State st;
  auto it = devices_.find(name);
  if (it == devices_.end()) {
    auto e = errors_.find(name);
    st.state = "Unavailable";
    st.error = e != errors_.end() ? e->second : "not served";
    return st;
  }
  st.dev_id = it->second->dev_id();
  st.device_path = it->second->block_path();
  st.copy_mode = it->second->zero_copy() ? "zero" : it->second->user_copy() ? "user" : "buffer";
  auto info = ctl_->get_dev_info(static_cast<uint32_t>(st.dev_id));
  if (!info.ok()) {
    st.state = "Unknown";
    st.error = info.status().message();
  } else {
    st.state = UblkStateName(info.value().state);
  }
  if (it->second->queues_failed()) st.error = "a queue failed (see the log)";
  return st;
}

void UblkService::detach_all() {
  std::map<std::string, std::unique_ptr<UblkDevice>> devs;
  {
    std::lock_guard<std::mutex> lock(mu_);
    devs.swap(devices_);
  }
  for (auto& [name, d] : devs) d->detach();
}

}  // namespace rpoint
