// ListResources: the one body of every `rpoint NOUN list` (cli/command.h).
#include "cli/command.h"
#include "cli/table.h"

namespace rpoint::cli {

using json = nlohmann::ordered_json;

int ListResources(Context& ctx, const std::string& path, const char* none,
                  const std::vector<std::string>& headers,
                  const std::function<std::vector<std::string>(const json&)>& row) {
  HttpReply r;
  int rc;
  if (!Call(ctx, "GET", path, std::nullopt, &r, &rc)) return rc;
  if (!r.json || !r.json->is_object()) {
    ctx.err << "rpoint: rpointd sent a reply that is not a JSON object\n";
    return kExitServerError;
  }
  if (ctx.output == OutputFormat::kJson) {
    PrintJson(ctx, *r.json);
    return kExitOk;
  }
  auto it = r.json->find("value");
  static const json kEmpty = json::array();
  const json& value = it != r.json->end() && it->is_array() ? *it : kEmpty;
  if (value.empty() && none != nullptr) {
    ctx.err << none << '\n';
    return kExitOk;
  }
  Table t(headers);
  for (const json& item : value) t.add(row(item));
  t.print(ctx.out);
  return kExitOk;
}

}  // namespace rpoint::cli
