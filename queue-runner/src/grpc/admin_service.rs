//! `AdminService`: each method authenticates the caller (role admin), calls one use case of
//! [`crate::admin`] (or of [`crate::tokens`]), and maps its typed error through
//! [`super::status`].

use drover_proto::v1::admin_service_server::AdminService;
use drover_proto::v1::{
    ApiToken, Certificate, CreateTokenRequest, CreateTokenResponse, ListCertificatesRequest,
    ListCertificatesResponse, ListMachinesRequest, ListMachinesResponse, ListTokensRequest,
    ListTokensResponse, Machine, MachineRequest, MachineResponse, PinBuildRequest,
    PinBuildResponse, RevokeCertificateRequest, RevokeCertificateResponse, RevokeTokenRequest,
    RevokeTokenResponse, SetAdmissionCapRequest, SetAdmissionCapResponse, SetGlobalPriorityRequest,
    SetGlobalPriorityResponse,
};
use drover_tls::Role;
use tonic::{Request, Response, Status};

use super::auth;
use crate::admin::{Admin, Steer};
use crate::db::certificates::CertificateRow;
use crate::db::machines::MachineStatus;
use crate::db::tokens::TokenRow;
use crate::tokens::Tokens;

/// Roles that may use the admin service.
const CALLERS: &[Role] = &[Role::Admin];

/// The admin service.
pub struct AdminServiceImpl {
    admin: Admin,
    tokens: Tokens,
}

impl AdminServiceImpl {
    /// The service over `admin` and `tokens`.
    #[must_use]
    pub const fn new(admin: Admin, tokens: Tokens) -> Self {
        Self { admin, tokens }
    }

    async fn steer(
        &self,
        request: Request<MachineRequest>,
        steer: Steer,
    ) -> Result<Response<MachineResponse>, Status> {
        let caller = auth::require(&request, CALLERS)?;
        let machine = self
            .admin
            .steer(&caller, &request.into_inner().name, steer)
            .await?;
        Ok(Response::new(MachineResponse {
            machine: Some(wire_machine(machine)),
        }))
    }
}

#[tonic::async_trait]
impl AdminService for AdminServiceImpl {
    async fn list_machines(
        &self,
        request: Request<ListMachinesRequest>,
    ) -> Result<Response<ListMachinesResponse>, Status> {
        auth::require(&request, CALLERS)?;
        let machines = self.admin.machines().await?;
        Ok(Response::new(ListMachinesResponse {
            machines: machines.into_iter().map(wire_machine).collect(),
        }))
    }

    async fn drain_machine(
        &self,
        request: Request<MachineRequest>,
    ) -> Result<Response<MachineResponse>, Status> {
        self.steer(request, Steer::Drain).await
    }

    async fn enable_machine(
        &self,
        request: Request<MachineRequest>,
    ) -> Result<Response<MachineResponse>, Status> {
        self.steer(request, Steer::Enable).await
    }

    async fn quarantine_machine(
        &self,
        request: Request<MachineRequest>,
    ) -> Result<Response<MachineResponse>, Status> {
        self.steer(request, Steer::Quarantine).await
    }

    async fn lift_quarantine(
        &self,
        request: Request<MachineRequest>,
    ) -> Result<Response<MachineResponse>, Status> {
        self.steer(request, Steer::Lift).await
    }

    async fn set_global_priority(
        &self,
        request: Request<SetGlobalPriorityRequest>,
    ) -> Result<Response<SetGlobalPriorityResponse>, Status> {
        let caller = auth::require(&request, CALLERS)?;
        let request = request.into_inner();
        self.admin
            .set_global_priority(&caller, request.build_id, request.global_priority)
            .await?;
        Ok(Response::new(SetGlobalPriorityResponse {}))
    }

    async fn pin_build(
        &self,
        request: Request<PinBuildRequest>,
    ) -> Result<Response<PinBuildResponse>, Status> {
        let caller = auth::require(&request, CALLERS)?;
        let request = request.into_inner();
        self.admin
            .pin_build(&caller, request.build_id, request.pinned)
            .await?;
        Ok(Response::new(PinBuildResponse {}))
    }

    async fn set_admission_cap(
        &self,
        request: Request<SetAdmissionCapRequest>,
    ) -> Result<Response<SetAdmissionCapResponse>, Status> {
        let caller = auth::require(&request, CALLERS)?;
        let (previous, queued_steps) = self
            .admin
            .set_admission_cap(&caller, request.into_inner().max_queued_steps)
            .await?;
        Ok(Response::new(SetAdmissionCapResponse {
            previous,
            queued_steps,
        }))
    }

    async fn list_certificates(
        &self,
        request: Request<ListCertificatesRequest>,
    ) -> Result<Response<ListCertificatesResponse>, Status> {
        auth::require(&request, CALLERS)?;
        let certificates = self.admin.certificates().await?;
        Ok(Response::new(ListCertificatesResponse {
            certificates: certificates.into_iter().map(wire_certificate).collect(),
        }))
    }

    async fn revoke_certificate(
        &self,
        request: Request<RevokeCertificateRequest>,
    ) -> Result<Response<RevokeCertificateResponse>, Status> {
        let caller = auth::require(&request, CALLERS)?;
        let named = self
            .admin
            .revoke(&caller, &request.into_inner().serial)
            .await?;
        Ok(Response::new(RevokeCertificateResponse {
            identity: named.map_or_else(String::new, |(role, name)| format!("{role}/{name}")),
        }))
    }

    async fn create_token(
        &self,
        request: Request<CreateTokenRequest>,
    ) -> Result<Response<CreateTokenResponse>, Status> {
        let caller = auth::require(&request, CALLERS)?;
        let request = request.into_inner();
        let token = self
            .tokens
            .create(&caller, &request.name, &request.role)
            .await?;
        Ok(Response::new(CreateTokenResponse { token }))
    }

    async fn revoke_token(
        &self,
        request: Request<RevokeTokenRequest>,
    ) -> Result<Response<RevokeTokenResponse>, Status> {
        let caller = auth::require(&request, CALLERS)?;
        self.tokens
            .revoke(&caller, &request.into_inner().name)
            .await?;
        Ok(Response::new(RevokeTokenResponse {}))
    }

    async fn list_tokens(
        &self,
        request: Request<ListTokensRequest>,
    ) -> Result<Response<ListTokensResponse>, Status> {
        auth::require(&request, CALLERS)?;
        let tokens = self.tokens.list().await?;
        Ok(Response::new(ListTokensResponse {
            tokens: tokens.into_iter().map(wire_token).collect(),
        }))
    }
}

/// A certificate as the API shows it.
fn wire_certificate(certificate: CertificateRow) -> Certificate {
    Certificate {
        serial: certificate.serial,
        role: certificate.role,
        name: certificate.name,
        first_seen_at_ms: certificate.first_seen_at_ms,
        last_seen_at_ms: certificate.last_seen_at_ms,
        revoked_at_ms: certificate.revoked_at_ms.unwrap_or(0),
        revoked_by: certificate.revoked_by.unwrap_or_default(),
    }
}

/// A builder as the API shows it.
fn wire_machine(machine: MachineStatus) -> Machine {
    Machine {
        name: machine.name,
        state: machine.state,
        systems: machine.systems,
        max_jobs: machine.max_jobs,
        running_steps: machine.running_steps,
        last_ping_at_ms: machine.last_ping_at_ms.unwrap_or(0),
        free_disk_bytes: machine.free_disk_bytes,
        memory_pressure_percent: machine.memory_pressure_percent,
        drained_at_ms: machine.drained_at_ms.unwrap_or(0),
        quarantine_reason: machine.quarantine_reason.unwrap_or_default(),
        quarantined_at_ms: machine.quarantined_at_ms.unwrap_or(0),
        probation_from_ms: machine.probation_from_ms.unwrap_or(0),
    }
}

/// A token as the API shows it.
#[must_use]
pub fn wire_token(token: TokenRow) -> ApiToken {
    ApiToken {
        name: token.name,
        role: token.role,
        created_at_ms: token.created_at_ms,
        created_by: token.created_by,
        last_used_at_ms: token.last_used_at_ms.unwrap_or(0),
        revoked_at_ms: token.revoked_at_ms.unwrap_or(0),
        revoked_by: token.revoked_by.unwrap_or_default(),
    }
}
