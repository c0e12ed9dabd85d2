"""A VM's configuration is opaque: PUT /vms/{vm} keeps it as the exact JSON
text sent, and every place that echoes it (GET /vms/{vm}, GET /vms, a restore
point's sourceMetadata, its manifest file, a VM restored from the point) gives
back the same bytes, after a restart too. The raw response bodies are compared,
not a json.loads round trip (which would hide a normalised float).
"""
import os
import re

MiB = 1 << 20

# Numbers no double or 64-bit integer holds, key order z before a, unicode
# escapes, nested arrays, and whitespace as a client might send it.
CFG = ('{"z": 18446744073709551617, "a": [123456789012345678901234567890, 1e400,'
       ' 0.1000000000000000055511151231257827, -0.0, 1E+2, 2.50],'
       '  "s": "\\u00e9\\ud83d\\ude00", "n": [[[ ]], {}, [1, [2, [3]]]], "t": true, "u": null}')


def vm_body(cfg, disks='[{"id": "/disks/a"}]'):
    return ('{"properties": {"disks": ' + disks + ', "configuration": ' + cfg + '}}').encode()


def assert_echoed(r, cfg=CFG):
    assert r.status == 200 or r.status == 201, r
    pat = rb'"configuration": ?' + re.escape(cfg.encode())
    assert re.search(pat, r.raw), (cfg, r.raw[:2000])


def test_configuration_is_kept_byte_for_byte(daemon):
    d = daemon
    d.create_disk("a", 4 * MiB)
    r = d.api("PUT", "/vms/x", vm_body(CFG))
    assert r.status == 201, r
    assert_echoed(r)
    assert_echoed(d.api("GET", "/vms/x"))
    assert_echoed(d.api("GET", "/vms"))

    d.create_collection("c", "x")
    d.create_restore_point("c", "rp")
    point = d.api("GET", "/restorePointCollections/c/restorePoints/rp")
    assert_echoed(point)
    with open(os.path.join(d.region_dir(), "manifests", "c~rp.json"), "rb") as f:
        manifest = f.read()
    assert re.search(rb'"configuration": ' + re.escape(CFG.encode()), manifest), manifest

    d.restore_vm("c", "rp", "new")
    assert_echoed(d.api("GET", "/vms/new"))

    assert d.stop() == 0
    d.start()
    assert_echoed(d.api("GET", "/vms/x"))
    assert_echoed(d.api("GET", "/vms/new"))
    assert_echoed(d.api("GET", "/vms"))
    assert_echoed(d.api("GET", "/restorePointCollections/c/restorePoints/rp"))
    # A fresh metadata.db: the point is imported from its manifest, bytes kept.
    assert d.stop() == 0
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(os.path.join(d.state_dir, "metadata.db" + suffix)):
            os.unlink(os.path.join(d.state_dir, "metadata.db" + suffix))
    d.start()
    assert_echoed(d.api("GET", "/restorePointCollections/c/restorePoints/rp"))
    d.restore_vm("c", "rp", "again")
    assert_echoed(d.api("GET", "/vms/again"))
    d.create_disk("a", 4 * MiB)
    # Replacing the VM replaces the text, as sent again.
    plain = '{"cpus":2}'
    assert_echoed(d.api("PUT", "/vms/x", vm_body(plain)), plain)
    assert_echoed(d.api("GET", "/vms/x"), plain)


def test_configuration_must_still_be_valid_json(daemon):
    d = daemon
    d.create_disk("a", 4 * MiB)
    bad = ['[1,]', '01', '1.', '-', '[1e400x]', '{"a": 1, "a": 2}', '"\\x"', 'nul',
           '{"a" 1}', '--1', '1e5.3', '[' * 63 + ']' * 63]
    for cfg in bad:
        r = d.api("PUT", "/vms/x", vm_body(cfg))
        assert r.status == 400, (cfg, r)
        assert r.json["error"]["code"] == "InvalidJson", (cfg, r)
    r = d.api("PUT", "/vms/x", vm_body('[' * 63 + ']' * 63))
    assert "nested deeper than 64" in r.json["error"]["message"], r
    # Outside the configuration numbers are still checked for range.
    r = d.api("PUT", "/vms/x", vm_body('{}', disks='[1e400]'))
    assert r.status == 400 and r.json["error"]["code"] == "InvalidJson", r
    assert d.api("GET", "/vms/x").status == 404
    # The deepest accepted configuration (62 levels in the 2-level envelope).
    deep = '[' * 62 + '1e400' + ']' * 62
    r = d.api("PUT", "/vms/x", vm_body(deep))
    assert r.status == 201, r
    assert_echoed(d.api("GET", "/vms/x"), deep)
