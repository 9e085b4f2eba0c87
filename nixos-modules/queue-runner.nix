# services.drover.queue-runner: drover's queue runner as a hardened systemd service (Type=notify,
# watchdog, reload on SIGHUP), its configuration generated from typed options with the TOML
# generator, secrets read from paths at run time (never copied into the store) with the group that
# may read them (NixOS's keys), and optionally a local PostgreSQL database and role. A remote
# database is reached with a password read from a file and TLS (ssl_mode).
{ config, lib, pkgs, ... }:
let
  cfg = config.services.drover.queue-runner;
  common = import ./common.nix { inherit lib; };
  toml = pkgs.formats.toml { };
  configFile = toml.generate "queue-runner.toml" (common.withoutNulls cfg.settings);
  inherit (lib) mkOption types;
  secretPath = common.runtimePath;
in
{
  options.services.drover.queue-runner = {
    enable = lib.mkEnableOption "the drover queue runner";

    package = mkOption {
      type = types.package;
      description = "The drover package providing bin/drover-queue-runner.";
    };

    createLocalDatabase = mkOption {
      type = types.bool;
      default = true;
      description = ''
        Create a local PostgreSQL database and role named "drover", owned by the service's
        user, reached over the Unix socket with peer authentication.
      '';
    };

    secretsGroup = mkOption {
      type = types.nullOr types.str;
      default = "keys";
      description = ''
        The group that may read the secret files (NixOS keeps deployment keys in /run/keys,
        readable by group keys); the service gets it as a supplementary group. null: none.
      '';
    };

    openFirewall = mkOption {
      type = types.bool;
      default = false;
      description = "Open the gRPC and binary cache ports in the firewall, and the web listener's if settings.web.listen is set.";
    };

    settings = mkOption {
      description = ''
        The runner's configuration (queue-runner.toml); `drover-queue-runner
        --print-default-config` prints every key with its default. Keys not declared here are
        passed through as they are.
      '';
      default = { };
      type = types.submodule {
        freeformType = toml.type;
        options = {
          database = {
            url = mkOption {
              type = types.str;
              default = "host=/run/postgresql dbname=drover user=drover";
              description = "libpq connection string.";
            };
            password_file = mkOption {
              type = types.nullOr types.str;
              default = null;
              example = "/run/keys/drover/database-password";
              description = "File holding the database password, read at start; the URL then carries no password.";
            };
            ssl_mode = mkOption {
              type = types.enum [ "disable" "require" "verify-full" ];
              default = "disable";
              description = ''
                TLS to PostgreSQL. disable: none (the local Unix socket needs none). require:
                encrypted, the server's certificate not checked. verify-full: encrypted, the
                certificate checked against ssl_root_certificate and the host name.
              '';
            };
            ssl_root_certificate = mkOption {
              type = types.nullOr types.str;
              default = null;
              example = "/run/keys/drover/postgresql-ca.pem";
              description = "PEM file of the CA that signed PostgreSQL's certificate (verify-full).";
            };
          };
          grpc.listen = mkOption {
            type = types.str;
            default = "0.0.0.0:7700";
            description = "Address of the mTLS gRPC server (builders and clients).";
          };
          tls = {
            ca_certificate = secretPath "PEM file of the farm's CA.";
            certificate = secretPath "PEM file of the runner's certificate (role runner).";
            key = secretPath "PEM file of the runner's private key; read at run time, never copied into the store.";
          };
          logs.directory = mkOption {
            type = types.str;
            default = "/var/log/drover";
            description = "Where step logs are stored.";
          };
          cache = {
            directory = mkOption {
              type = types.str;
              default = "/var/lib/drover/cache";
              description = "The binary cache's directory.";
            };
            listen = mkOption {
              type = types.str;
              default = "0.0.0.0:7701";
              description = "Address of the binary cache (plain HTTP), /healthz and /readyz.";
            };
            secret_key_file = secretPath "The cache's signing key (nix-store --generate-binary-cache-key); read at run time.";
          };
        };
      };
    };
  };

  config = lib.mkIf cfg.enable {
    assertions = [{
      assertion = cfg.settings.database.ssl_mode != "verify-full"
        || cfg.settings.database.ssl_root_certificate != null;
      message = "services.drover.queue-runner.settings.database.ssl_mode = \"verify-full\" needs settings.database.ssl_root_certificate.";
    }];

    users.users.drover = {
      isSystemUser = true;
      group = "drover";
      home = "/var/lib/drover";
    };
    users.groups.drover = { };

    services.postgresql = lib.mkIf cfg.createLocalDatabase {
      enable = true;
      ensureDatabases = [ "drover" ];
      ensureUsers = [{
        name = "drover";
        ensureDBOwnership = true;
      }];
    };

    networking.firewall.allowedTCPPorts = lib.mkIf cfg.openFirewall ([
      (common.portOf cfg.settings.grpc.listen)
      (common.portOf cfg.settings.cache.listen)
    ] ++ lib.optional ((cfg.settings.web or { }) ? listen)
      (common.portOf cfg.settings.web.listen));

    systemd.services.drover-queue-runner = {
      description = "drover queue runner (build queue, scheduler, binary cache)";
      wantedBy = [ "multi-user.target" ];
      wants = [ "network-online.target" ];
      # Recent nixpkgs creates the database and role in postgresql-setup.service; systemd ignores
      # ordering on a unit that does not exist, so older ones and remote databases are fine.
      after = [ "network-online.target" "postgresql-setup.service" ]
        ++ lib.optional cfg.createLocalDatabase "postgresql.service";
      requires = lib.optional cfg.createLocalDatabase "postgresql.service";
      environment.MALLOC_ARENA_MAX = "2";
      serviceConfig = common.hardening // {
        Type = "notify";
        NotifyAccess = "main";
        ExecStart = "${cfg.package}/bin/drover-queue-runner --config ${configFile} run";
        ExecReload = "${pkgs.coreutils}/bin/kill -HUP $MAINPID";
        User = "drover";
        Group = "drover";
        SupplementaryGroups = lib.optional (cfg.secretsGroup != null) cfg.secretsGroup;
        StateDirectory = "drover";
        StateDirectoryMode = "0750";
        LogsDirectory = "drover";
        LogsDirectoryMode = "0750";
        Restart = "on-failure";
        RestartSec = "5s";
        RestartPreventExitStatus = 78;
        WatchdogSec = "60s";
        TimeoutStopSec = "60s";
        LimitNOFILE = 65536;
        PrivateDevices = true;
        ProtectProc = "invisible";
        RestrictNamespaces = true;
        MemoryDenyWriteExecute = true;
        RemoveIPC = true;
        RestrictAddressFamilies = [ "AF_UNIX" "AF_INET" "AF_INET6" ];
        SystemCallArchitectures = "native";
        SystemCallFilter = [ "@system-service" "~@privileged @resources" ];
        CapabilityBoundingSet = "";
        UMask = "0027";
      };
    };
  };
}
