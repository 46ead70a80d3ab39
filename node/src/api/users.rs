//! The API's users: who a token belongs to, what they may do, and how much
//! of this node they may hold.
//!
//! A token is shown once, when the user is made; the node keeps only its
//! BLAKE3 hash (in the `users` tree), so a copy of the database gives no
//! one a way in. The node's own token (`api.token`) is the admin `node`.
//! Every job belongs to its submitter; the limits here cap what one user
//! holds at once, so one researcher cannot fill the node for the others.

use std::sync::Arc;

use alliance_protocol::{Hash, Timestamp};
use axum::Json;
use axum::extract::{Extension, Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

use super::{ApiError, ApiState, Typed, admin_only, body_json};
use crate::submit::records::NODE_USER;

/// Who made a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub name: String,
    pub admin: bool,
}

/// What one user may hold at once (`[api.per_user]` in the config).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(default, deny_unknown_fields)]
pub struct UserLimits {
    /// Jobs not yet ended.
    pub running_jobs: u32,
    /// Tasks of those jobs not yet ended.
    pub queued_tasks: u64,
    /// Bytes uploaded and kept for the user's jobs.
    pub stored_bytes: u64,
}

impl Default for UserLimits {
    fn default() -> Self {
        Self {
            running_jobs: 32,
            queued_tasks: 200_000,
            stored_bytes: 64 << 30,
        }
    }
}

/// A user as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Stored {
    admin: bool,
    /// BLAKE3 of the token.
    token_hash: Hash,
    created_at: Timestamp,
}

/// A user as listed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct UserView {
    pub name: String,
    pub admin: bool,
    /// Seconds since the Unix epoch.
    #[schema(value_type = u64)]
    pub created_at: Timestamp,
}

/// The users of this node's API; cheap to clone.
#[derive(Clone)]
pub struct Users {
    inner: Arc<Inner>,
}

struct Inner {
    users: sled::Tree,
    /// `user NUL blob-hash` → bytes: what each user uploaded.
    stored: sled::Tree,
    node_token: String,
    limits: UserLimits,
}

impl std::fmt::Debug for Users {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Users").finish_non_exhaustive()
    }
}

/// A new random token.
pub(super) fn fresh_token() -> anyhow::Result<String> {
    let mut raw = [0u8; 32];
    getrandom::fill(&mut raw).map_err(|e| anyhow::anyhow!("no randomness from the system: {e}"))?;
    Ok(format!("alliance_{}", hex::encode(raw)))
}

/// Equal, compared in constant time: the token is a secret.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn db(e: impl std::fmt::Display) -> ApiError {
    ApiError::of(
        StatusCode::INTERNAL_SERVER_ERROR,
        format!("the user database failed: {e}"),
    )
}

fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

impl Users {
    /// The users in `store`, with the node's own token and the limits.
    pub fn open(
        store: &crate::store::Store,
        node_token: String,
        limits: UserLimits,
    ) -> Result<Self, sled::Error> {
        Ok(Self {
            inner: Arc::new(Inner {
                users: store.tree("users")?,
                stored: store.tree("user_blobs")?,
                node_token,
                limits,
            }),
        })
    }

    pub fn limits(&self) -> &UserLimits {
        &self.inner.limits
    }

    /// Who holds `token`, if anyone.
    pub fn authenticate(&self, token: &str) -> Option<Caller> {
        if same(token.as_bytes(), self.inner.node_token.as_bytes()) {
            return Some(Caller {
                name: NODE_USER.into(),
                admin: true,
            });
        }
        let hash = Hash::of(token.as_bytes());
        self.inner.users.iter().flatten().find_map(|(k, v)| {
            let u: Stored = serde_json::from_slice(&v).ok()?;
            same(u.token_hash.as_bytes(), hash.as_bytes()).then(|| Caller {
                name: String::from_utf8_lossy(&k).into_owned(),
                admin: u.admin,
            })
        })
    }

    /// Makes user `name`; returns their token, which is not kept.
    pub fn add(&self, name: &str, admin: bool) -> Result<String, ApiError> {
        if !valid_name(name) || name == NODE_USER {
            return Err(ApiError::of(
                StatusCode::BAD_REQUEST,
                format!("{name:?} cannot be a user name"),
            )
            .hint(format!(
                "use 1 to 64 letters, digits, '.', '_' or '-'; {NODE_USER:?} is the node's own"
            )));
        }
        let token = fresh_token().map_err(db)?;
        let user = Stored {
            admin,
            token_hash: Hash::of(token.as_bytes()),
            created_at: Timestamp::now(),
        };
        let value = serde_json::to_vec(&user).map_err(db)?;
        let made = self
            .inner
            .users
            .compare_and_swap(name, None::<&[u8]>, Some(value))
            .map_err(db)?;
        if made.is_err() {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "user_exists",
                format!("user {name} exists already"),
            )
            .hint(format!(
                "revoke it first (`alliance user revoke {name}`) to give them a new token"
            )));
        }
        self.inner.users.flush().map_err(db)?;
        Ok(token)
    }

    /// Every user, the node's own first.
    pub fn list(&self) -> Vec<UserView> {
        let mut out = vec![UserView {
            name: NODE_USER.into(),
            admin: true,
            created_at: Timestamp::from_secs(0),
        }];
        out.extend(self.inner.users.iter().flatten().filter_map(|(k, v)| {
            let u: Stored = serde_json::from_slice(&v).ok()?;
            Some(UserView {
                name: String::from_utf8_lossy(&k).into_owned(),
                admin: u.admin,
                created_at: u.created_at,
            })
        }));
        out
    }

    /// Takes user `name`'s token away; their jobs stay.
    pub fn revoke(&self, name: &str) -> Result<(), ApiError> {
        if self.inner.users.remove(name).map_err(db)?.is_none() {
            return Err(ApiError::of(
                StatusCode::NOT_FOUND,
                format!("no user {name} on this node"),
            )
            .hint("`alliance user list` shows them"));
        }
        self.inner.users.flush().map_err(db)?;
        Ok(())
    }

    fn stored_key(user: &str, hash: &Hash) -> Vec<u8> {
        let mut k = user.as_bytes().to_vec();
        k.push(0);
        k.extend_from_slice(hash.as_bytes());
        k
    }

    /// Bytes `user` has uploaded.
    pub fn stored_bytes(&self, user: &str) -> u64 {
        let mut prefix = user.as_bytes().to_vec();
        prefix.push(0);
        self.inner
            .stored
            .scan_prefix(prefix)
            .flatten()
            .filter_map(|(_, v)| v.as_ref().try_into().ok().map(u64::from_be_bytes))
            .sum()
    }

    /// Whether `user` already holds the blob `hash`.
    pub fn holds(&self, user: &str, hash: &Hash) -> bool {
        self.inner
            .stored
            .contains_key(Self::stored_key(user, hash))
            .unwrap_or(false)
    }

    /// Stops counting the blob `hash` against `user`; the bytes it counted.
    pub fn release(&self, user: &str, hash: &Hash) -> Result<u64, ApiError> {
        let removed = self
            .inner
            .stored
            .remove(Self::stored_key(user, hash))
            .map_err(db)?
            .ok_or_else(|| {
                ApiError::new(
                    StatusCode::NOT_FOUND,
                    "not_held",
                    format!("user {user} holds no upload {hash}"),
                )
                .hint("GET /v1/me says how many bytes you hold; only a whole upload is held")
            })?;
        self.inner.stored.flush().map_err(db)?;
        Ok(removed
            .as_ref()
            .try_into()
            .map(u64::from_be_bytes)
            .unwrap_or(0))
    }

    /// Counts the blob `hash` of `len` bytes against `user`.
    pub fn record_upload(&self, user: &str, hash: &Hash, len: u64) -> Result<(), ApiError> {
        self.inner
            .stored
            .insert(Self::stored_key(user, hash), &len.to_be_bytes())
            .map_err(db)?;
        Ok(())
    }

    /// Refuses `more` bytes that would take `user` past their limit.
    pub fn check_room(&self, user: &str, more: u64) -> Result<(), ApiError> {
        let used = self.stored_bytes(user);
        let max = self.inner.limits.stored_bytes;
        if used.saturating_add(more) > max {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "limit_stored_bytes",
                format!(
                    "user {user} holds {used} bytes of uploads; {more} more would pass the limit of {max}"
                ),
            )
            .hint("the node's admin sets api.per_user.stored_bytes in its config"));
        }
        Ok(())
    }
}

/// Lets a request through with its [`Caller`] when its token is known.
pub(super) async fn authorize(
    State(s): State<ApiState>,
    mut request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let given = request
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let Some(given) = given else {
        return ApiError::new(
            StatusCode::UNAUTHORIZED,
            "no_token",
            "this request carries no token",
        )
        .into_response();
    };
    match s.users.authenticate(given.trim()) {
        Some(caller) => {
            request.extensions_mut().insert(caller);
            next.run(request).await
        }
        None => ApiError::new(
            StatusCode::UNAUTHORIZED,
            "bad_token",
            "the token is not one this node knows (or it was revoked)",
        )
        .into_response(),
    }
}

/// `POST /v1/users` body.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct NewUser {
    pub name: String,
    #[serde(default)]
    pub admin: bool,
}

/// `POST /v1/users` answer: the token, shown this once.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct NewToken {
    pub name: String,
    pub admin: bool,
    pub token: String,
}

/// `GET /v1/me` answer.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Me {
    pub name: String,
    pub admin: bool,
    pub running_jobs: u32,
    pub queued_tasks: u64,
    pub stored_bytes: u64,
    pub limits: UserLimits,
}

/// Make a user and their token.
#[utoipa::path(post, path = "/v1/users", request_body = NewUser, tag = "users",
    responses((status = 200, body = NewToken), (status = 403, body = super::ErrorBody), (status = 409, body = super::ErrorBody)))]
pub(super) async fn add(
    State(s): State<ApiState>,
    Extension(c): Extension<Caller>,
    body: axum::body::Bytes,
) -> Typed<NewToken> {
    admin_only(&c)?;
    let u: NewUser = body_json(&body)?;
    let token = s.users.add(&u.name, u.admin)?;
    Ok(Json(NewToken {
        name: u.name,
        admin: u.admin,
        token,
    }))
}

/// Every user.
#[utoipa::path(get, path = "/v1/users", tag = "users",
    responses((status = 200, body = Vec<UserView>), (status = 403, body = super::ErrorBody)))]
pub(super) async fn list(
    State(s): State<ApiState>,
    Extension(c): Extension<Caller>,
) -> Typed<Vec<UserView>> {
    admin_only(&c)?;
    Ok(Json(s.users.list()))
}

/// `DELETE /v1/users/NAME` answer.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Revoked {
    /// The user whose token no longer works.
    pub revoked: String,
}

/// Take a user's token away.
#[utoipa::path(delete, path = "/v1/users/{name}", tag = "users",
    params(("name" = String, Path)),
    responses((status = 200, body = Revoked), (status = 403, body = super::ErrorBody), (status = 404, body = super::ErrorBody)))]
pub(super) async fn revoke(
    State(s): State<ApiState>,
    Extension(c): Extension<Caller>,
    Path(name): Path<String>,
) -> Typed<Revoked> {
    admin_only(&c)?;
    s.users.revoke(&name)?;
    Ok(Json(Revoked { revoked: name }))
}

/// Who the token belongs to, what they hold and may hold.
#[utoipa::path(get, path = "/v1/me", tag = "users", responses((status = 200, body = Me)))]
pub(super) async fn me(State(s): State<ApiState>, Extension(c): Extension<Caller>) -> Typed<Me> {
    let (running_jobs, queued_tasks) = match &s.jobs {
        Some(j) => j.usage(&c.name)?,
        None => (0, 0),
    };
    Ok(Json(Me {
        stored_bytes: s.users.stored_bytes(&c.name),
        name: c.name,
        admin: c.admin,
        running_jobs,
        queued_tasks,
        limits: s.users.limits().clone(),
    }))
}
