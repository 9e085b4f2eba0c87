# What the drover modules share: the systemd hardening both units start from, the option for a
# file read at run time (a path as a string, so a secret is never copied into the store), the
# settings without their unset (null) keys, which TOML cannot write, and the TCP port of a
# "host:port" listen address.
{ lib }:
{
  hardening = {
    NoNewPrivileges = true;
    ProtectSystem = "strict";
    ProtectHome = true;
    PrivateTmp = true;
    ProtectKernelTunables = true;
    ProtectKernelModules = true;
    ProtectKernelLogs = true;
    ProtectControlGroups = true;
    ProtectClock = true;
    ProtectHostname = true;
    RestrictRealtime = true;
    RestrictSUIDSGID = true;
    LockPersonality = true;
  };

  runtimePath = description: lib.mkOption {
    type = lib.types.str;
    inherit description;
    example = "/run/keys/drover/key.pem";
  };

  # TOML has no null: an optional key left unset (null) is left out of the file, so the service
  # applies its own default.
  withoutNulls = lib.filterAttrsRecursive (_: value: value != null);

  portOf = listen: lib.toInt (lib.last (lib.splitString ":" listen));
}
