# drover's NixOS modules: services.drover.queue-runner and services.drover.builder.
{
  imports = [ ./queue-runner.nix ./builder.nix ];
}
