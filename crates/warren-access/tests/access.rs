//! AccessControl end to end: logins, grants, changes and the access file.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use warren_access::{
    Access, AccessControl, DeclaredPassword, DeclaredUser, Definitions, Grant, HashingAlgorithm,
    LoginError, PasswordChange, PasswordHash, PermissionEntry, Permissions, Resource, Tags,
    VhostRefusal,
};

const LOOPBACK: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
const REMOTE: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7));

fn guest_defaults() -> Definitions {
    Definitions {
        users: vec![DeclaredUser {
            name: "guest".into(),
            password: DeclaredPassword::Plain("guest".into()),
            tags: Tags::administrator(),
        }],
        vhosts: vec!["/".into()],
        permissions: vec![PermissionEntry {
            user: "guest".into(),
            vhost: "/".into(),
            permissions: Arc::new(Permissions::full()),
        }],
    }
}

fn open(dir: &std::path::Path, declared: Definitions) -> AccessControl {
    AccessControl::open(
        Some(dir.to_owned()),
        guest_defaults(),
        declared,
        vec!["guest".into()],
    )
    .unwrap()
}

#[test]
fn logins_check_password_and_origin() {
    let access = AccessControl::in_memory(guest_defaults(), vec!["guest".into()]);
    assert_eq!(
        access
            .login_with_password("guest", "guest", LOOPBACK)
            .unwrap()
            .name,
        "guest"
    );
    assert_eq!(
        access.login_with_password("guest", "guest", REMOTE),
        Err(LoginError::LoopbackOnly {
            user: "guest".into()
        })
    );
    // A wrong password from afar is a refusal, not a hint that the user exists.
    assert!(matches!(
        access.login_with_password("guest", "nope", REMOTE),
        Err(LoginError::Refused { .. })
    ));
    assert!(matches!(
        access.login_with_password("nobody", "guest", LOOPBACK),
        Err(LoginError::Refused { .. })
    ));
    access
        .put_user("cert-only", PasswordChange::Clear, Tags::default())
        .unwrap();
    assert!(
        access
            .login_with_password("cert-only", "", LOOPBACK)
            .is_err()
    );
    assert!(access.login_external("cert-only", REMOTE).is_ok());
    assert!(access.login_external("nobody", REMOTE).is_err());
}

#[test]
fn opening_a_vhost_needs_permissions_there() {
    let access = AccessControl::in_memory(guest_defaults(), vec![]);
    access.add_vhost("ml").unwrap();
    assert!(access.open_vhost("guest", "/").is_ok());
    assert_eq!(
        access.open_vhost("guest", "ml").unwrap_err(),
        VhostRefusal::NoPermissions {
            user: "guest".into(),
            vhost: "ml".into()
        }
    );
    assert_eq!(
        access.open_vhost("guest", "absent").unwrap_err(),
        VhostRefusal::NotFound("absent".into())
    );
}

#[test]
fn a_grant_sees_changes_made_after_it() {
    let access = Arc::new(AccessControl::in_memory(guest_defaults(), vec![]));
    let mut grant = Grant::new(Arc::clone(&access), "guest", "/");
    assert!(grant.check(Access::Write, Resource::exchange("")).is_ok());
    access
        .set_permissions(
            "guest",
            "/",
            Permissions::new(".*", "^logs$", ".*").unwrap(),
        )
        .unwrap();
    let refused = grant
        .check(Access::Write, Resource::exchange(""))
        .unwrap_err();
    assert_eq!(
        refused.to_string(),
        "access to exchange 'amq.default' in vhost '/' refused for user 'guest'"
    );
    assert!(
        grant
            .check(Access::Write, Resource::exchange("logs"))
            .is_ok()
    );
    access.clear_permissions("guest", "/").unwrap();
    assert!(grant.check(Access::Read, Resource::queue("q")).is_err());
}

/// A grant remembers the last check that passed, and nothing else: the
/// same right on another name, or another right on the same name, is
/// checked against the patterns.
#[test]
fn a_grant_remembers_only_the_check_that_passed() {
    let access = Arc::new(AccessControl::in_memory(guest_defaults(), vec![]));
    access
        .set_permissions("guest", "/", Permissions::new("", "^x$", "").unwrap())
        .unwrap();
    let mut grant = Grant::new(Arc::clone(&access), "guest", "/");
    assert!(grant.check(Access::Write, Resource::exchange("x")).is_ok());
    assert!(grant.check(Access::Read, Resource::exchange("x")).is_err());
    assert!(
        grant
            .check(Access::Write, Resource::exchange("xy"))
            .is_err()
    );
    assert!(
        grant
            .check(Access::Configure, Resource::queue("x"))
            .is_err()
    );
    assert!(grant.check(Access::Write, Resource::exchange("x")).is_ok());
    assert!(grant.check(Access::Write, Resource::exchange("")).is_err());
}

#[test]
fn changes_survive_a_restart_and_defaults_apply_once() {
    let dir = tempfile::tempdir().unwrap();
    {
        let access = open(dir.path(), Definitions::default());
        let hash = PasswordHash::generate("pw").unwrap();
        assert!(
            access
                .put_user(
                    "alice",
                    PasswordChange::Set(hash),
                    Tags::parse_list("management").unwrap()
                )
                .unwrap()
        );
        access.add_vhost("ml").unwrap();
        access
            .set_permissions(
                "alice",
                "ml",
                Permissions::new("^alice\\.", ".*", "").unwrap(),
            )
            .unwrap();
        access.delete_user("guest").unwrap();
    }
    let access = open(dir.path(), Definitions::default());
    assert!(
        access.user("guest").is_none(),
        "a deleted default user stays deleted"
    );
    let alice = access.login_with_password("alice", "pw", REMOTE).unwrap();
    assert!(alice.tags.can_manage() && !alice.tags.can_monitor());
    assert!(
        access
            .check("alice", "ml", Access::Configure, Resource::queue("alice.q"))
            .is_ok()
    );
    assert!(
        access
            .check("alice", "ml", Access::Configure, Resource::queue("bob.q"))
            .is_err()
    );
    assert!(
        access
            .check("alice", "ml", Access::Read, Resource::queue("alice.q"))
            .is_err()
    );
    let text = std::fs::read_to_string(dir.path().join("access.json")).unwrap();
    assert!(text.contains("$argon2id$") && !text.contains("\"pw\""));
}

#[test]
fn a_user_imported_with_a_rabbitmq_hash_logs_in_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    // RabbitMQ's SHA-256 hash of "test12" (its documentation's example).
    let imported = "kI3GCqW5JLMJa4iX1lo7X4D6XbYqlLgxIs30+P6tENUV2POR";
    {
        let access = open(dir.path(), Definitions::default());
        let hash = PasswordHash::with_algorithm(imported, HashingAlgorithm::RabbitSha256).unwrap();
        access
            .put_user("moved", PasswordChange::Set(hash), Tags::default())
            .unwrap();
        assert!(
            access
                .login_with_password("moved", "test12", REMOTE)
                .is_ok()
        );
    }
    let text = std::fs::read_to_string(dir.path().join("access.json")).unwrap();
    assert!(text.contains("rabbit_password_hashing_sha256"), "{text}");
    let access = open(dir.path(), Definitions::default());
    assert!(
        access
            .login_with_password("moved", "test12", REMOTE)
            .is_ok()
    );
    assert!(matches!(
        access.login_with_password("moved", "wrong", REMOTE),
        Err(LoginError::Refused { .. })
    ));
    let moved = access.user("moved").unwrap();
    assert_eq!(moved.password_hash.unwrap().as_str(), imported);
}

#[test]
fn declared_users_apply_at_every_start() {
    let dir = tempfile::tempdir().unwrap();
    let declared = |password: &str| Definitions {
        users: vec![DeclaredUser {
            name: "svc".into(),
            password: DeclaredPassword::Plain(password.into()),
            tags: Tags::default(),
        }],
        vhosts: vec!["jobs".into()],
        permissions: vec![PermissionEntry {
            user: "svc".into(),
            vhost: "jobs".into(),
            permissions: Arc::new(Permissions::full()),
        }],
    };
    drop(open(dir.path(), declared("one")));
    let access = open(dir.path(), declared("two"));
    assert!(access.login_with_password("svc", "one", REMOTE).is_err());
    assert!(access.login_with_password("svc", "two", REMOTE).is_ok());
    assert!(access.open_vhost("svc", "jobs").is_ok());
}

#[test]
fn deleting_a_vhost_or_user_drops_their_permissions() {
    let access = AccessControl::in_memory(guest_defaults(), vec![]);
    access.add_vhost("tmp").unwrap();
    access
        .set_permissions("guest", "tmp", Permissions::full())
        .unwrap();
    access.delete_vhost("tmp").unwrap();
    access.add_vhost("tmp").unwrap();
    assert!(
        access.open_vhost("guest", "tmp").is_err(),
        "permissions do not come back"
    );
    assert!(
        access
            .set_permissions("nobody", "/", Permissions::full())
            .is_err()
    );
    assert!(
        access
            .set_permissions("guest", "absent", Permissions::full())
            .is_err()
    );
    assert!(access.add_vhost("").is_err());
    assert!(access.delete_vhost("absent").is_err());
}

#[test]
fn a_change_that_cannot_be_saved_does_not_happen() {
    let dir = tempfile::tempdir().unwrap();
    let access = open(dir.path(), Definitions::default());
    // A directory where the temporary file should go makes the save fail.
    std::fs::create_dir(dir.path().join("access.json.tmp")).unwrap();
    assert!(access.add_vhost("lost").is_err());
    assert!(!access.vhost_exists("lost"));
}

#[test]
fn the_access_file_is_readable_by_its_owner_alone() {
    use std::os::unix::fs::PermissionsExt;
    let mode =
        |path: &std::path::Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("access.json");
    drop(open(dir.path(), Definitions::default()));
    assert_eq!(mode(&path), 0o600, "the first start writes the file 0600");

    // A file made readable by others (copied in by hand, or written by an
    // older version) is restricted again when the broker opens it.
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let access = open(dir.path(), Definitions::default());
    assert_eq!(mode(&path), 0o600, "opening restricts a readable file");

    // Every rewrite keeps it so, even over a leftover temporary file.
    let leftover = dir.path().join("access.json.tmp");
    std::fs::write(&leftover, b"{}").unwrap();
    std::fs::set_permissions(&leftover, std::fs::Permissions::from_mode(0o666)).unwrap();
    access.add_vhost("ml").unwrap();
    assert_eq!(
        mode(&path),
        0o600,
        "a rewrite over a leftover temporary file"
    );
}

#[test]
fn the_broker_s_own_identity_is_not_an_operator_s_user() {
    use warren_access::{AccessError, INTERNAL_USER};
    let dir = tempfile::tempdir().unwrap();
    let access = Arc::new(open(dir.path(), Definitions::default()));
    let secret = access.internal_secret().to_owned();
    assert!(secret.len() >= 32, "a secret worth the name: {secret}");

    let user = access
        .login_with_password(INTERNAL_USER, &secret, LOOPBACK)
        .unwrap();
    assert_eq!(user.name, INTERNAL_USER);
    assert!(!user.tags.can_manage(), "no management API for it");
    assert_eq!(
        access.login_with_password(INTERNAL_USER, &secret, REMOTE),
        Err(LoginError::Refused {
            user: INTERNAL_USER.into()
        }),
        "loopback only"
    );
    assert!(
        access
            .login_with_password(INTERNAL_USER, "guest", LOOPBACK)
            .is_err()
    );
    assert!(
        access.login_external(INTERNAL_USER, LOOPBACK).is_err(),
        "a certificate naming it proves nothing"
    );

    // Full permissions in every vhost that exists, whatever operators do to
    // guest; none in one that does not.
    access.delete_user("guest").unwrap();
    access.add_vhost("ml").unwrap();
    for vhost in ["/", "ml"] {
        assert!(access.open_vhost(INTERNAL_USER, vhost).is_ok());
        let mut grant = Grant::new(Arc::clone(&access), INTERNAL_USER, vhost);
        for operation in [Access::Configure, Access::Write, Access::Read] {
            assert!(grant.check(operation, Resource::queue("embed")).is_ok());
        }
    }
    assert_eq!(
        access.open_vhost(INTERNAL_USER, "absent").err(),
        Some(VhostRefusal::NotFound("absent".into()))
    );

    // Operators can neither create nor see it, and it is never stored.
    assert!(matches!(
        access.put_user(INTERNAL_USER, PasswordChange::Clear, Tags::administrator()),
        Err(AccessError::ReservedUserName(_))
    ));
    assert!(access.users().iter().all(|user| user.name != INTERNAL_USER));
    let text = std::fs::read_to_string(dir.path().join("access.json")).unwrap();
    assert!(!text.contains(INTERNAL_USER) && !text.contains(&secret));
    assert_ne!(
        open(dir.path(), Definitions::default()).internal_secret(),
        secret,
        "each start draws a new secret"
    );
}
