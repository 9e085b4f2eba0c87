# What the drover modules share: the systemd hardening both units start from, and the TCP port of
# a "host:port" listen address.
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

  portOf = listen: lib.toInt (lib.last (lib.splitString ":" listen));
}
