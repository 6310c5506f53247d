/// A validated policy file: the typed form of the YAML contract (BRIEF §3).
public struct Policy: Sendable {
    public var version: Int
    /// Sandbox name: logs, TAP name, state.
    public var name: String
    public var secrets: [Secret]
    public var network: NetworkPolicy
    public var guest: GuestSpec?
    /// The path the policy was read from, as given.
    public var file: String
    /// Non-fatal findings (for example `allow_any_host_dangerous: true`).
    public var warnings: [PolicyDiagnostic]
    /// Where the file set the keys a command-line flag can set too (`name`,
    /// `network.on_secret_violation`, `guest.image`, `guest.kernel`, `guest.memory_mib`,
    /// `guest.vcpus`), so that a conflict names both places.
    public var keyLocations: [String: SourceLocation] = [:]

    public init(
        version: Int = 1, name: String, secrets: [Secret], network: NetworkPolicy = NetworkPolicy(),
        guest: GuestSpec? = nil, file: String = "<memory>", warnings: [PolicyDiagnostic] = []
    ) {
        self.version = version
        self.name = name
        self.secrets = secrets
        self.network = network
        self.guest = guest
        self.file = file
        self.warnings = warnings
    }
}

/// Where a secret's real value came from (never the value itself).
public enum SecretSource: Sendable, Hashable, CustomStringConvertible {
    case environment(String)
    case file(String)
    case inline

    public var description: String {
        switch self {
        case .environment(let name): return "from_env \(name)"
        case .file(let path): return "from_file \(path)"
        case .inline: return "value (inline)"
        }
    }
}

/// Which parts of a request a secret may be substituted into.
public struct Injection: Sendable, Hashable {
    public var headers: Bool
    public var basicAuth: Bool
    public var query: Bool
    public var body: Bool

    public init(headers: Bool = true, basicAuth: Bool = true, query: Bool = false, body: Bool = false) {
        self.headers = headers
        self.basicAuth = basicAuth
        self.query = query
        self.body = body
    }
}

public struct Secret: Sendable, CustomStringConvertible {
    /// Guest environment variable that receives the placeholder.
    public var env: String
    public var placeholder: String
    public var value: SecretValue
    public var source: SecretSource
    public var allowedHosts: HostAllowList
    public var requireTLSIdentity: Bool
    public var inject: Injection
    /// Hosts the placeholder may travel to unchanged (never the value): an LLM API that gets
    /// an agent's transcript, say. Not a violation; audited as `passed-through`.
    public var passthroughHosts: HostAllowList
    /// This secret's own violation action; the stricter of it and the network's applies.
    public var onViolation: ViolationAction?
    public var location: SourceLocation?

    public init(
        env: String, placeholder: String? = nil, value: SecretValue, source: SecretSource = .inline,
        allowedHosts: HostAllowList, requireTLSIdentity: Bool = true, inject: Injection = Injection(),
        passthroughHosts: HostAllowList = HostAllowList(), onViolation: ViolationAction? = nil,
        location: SourceLocation? = nil
    ) {
        self.passthroughHosts = passthroughHosts
        self.onViolation = onViolation
        self.env = env
        self.placeholder = placeholder ?? Secret.defaultPlaceholder(forEnv: env)
        self.value = value
        self.source = source
        self.allowedHosts = allowedHosts
        self.requireTLSIdentity = requireTLSIdentity
        self.inject = inject
        self.location = location
    }

    public static func defaultPlaceholder(forEnv env: String) -> String { "$MSB_" + env }

    public var description: String {
        "Secret(env: \(env), placeholder: \(placeholder), value: \(SecretValue.redaction), source: \(source), hosts: \(allowedHosts))"
    }
}

public enum ViolationAction: String, Sendable, Hashable, CaseIterable {
    case block
    case blockAndLog = "block-and-log"
    case blockAndTerminate = "block-and-terminate"

    private var strictness: Int {
        switch self {
        case .block: return 0
        case .blockAndLog: return 1
        case .blockAndTerminate: return 2
        }
    }

    /// The stricter of two actions (a secret's own and the network's, as in microsandbox).
    public func stricter(_ other: ViolationAction?) -> ViolationAction {
        guard let other, other.strictness > strictness else { return self }
        return other
    }
}

/// What the guest gets when Keyhole blocks a request.
public enum BlockResponse: String, Sendable, Hashable, CaseIterable {
    /// The connection is reset (the reference pages' default).
    case reset
    /// Where Keyhole can still answer the request (intercepted TLS, plain HTTP), a `403`
    /// with a JSON body saying why, then the connection is closed; a reset otherwise.
    case http
}

public struct NetworkPolicy: Sendable {
    public var onSecretViolation: ViolationAction
    public var blockResponse: BlockResponse = .reset
    /// Extra PEM trust roots (resolved paths) for verifying upstream servers.
    public var upstreamCA: [String]
    /// Hosts whose TLS is relayed opaque (certificate-pinned clients).
    public var tlsBypass: HostAllowList
    public var egress: EgressPolicy
    public var gateway: InterfaceAddress?
    public var dns: [IPAddress]

    public init(
        onSecretViolation: ViolationAction = .block, upstreamCA: [String] = [],
        tlsBypass: HostAllowList = HostAllowList(), egress: EgressPolicy = EgressPolicy(),
        gateway: InterfaceAddress? = nil, dns: [IPAddress] = []
    ) {
        self.onSecretViolation = onSecretViolation
        self.upstreamCA = upstreamCA
        self.tlsBypass = tlsBypass
        self.egress = egress
        self.gateway = gateway
        self.dns = dns
    }
}

/// Rules for guest traffic that is not proxied (everything but TCP and DNS).
public struct EgressPolicy: Sendable, Hashable {
    public enum Default: String, Sendable, Hashable, CaseIterable {
        /// Public addresses allowed; private, loopback, link-local, metadata denied.
        case `public`
        /// Nothing unless listed in `allow`.
        case none
        /// Everything unless listed in `deny`.
        case all
    }

    public enum Rule: Sendable, Hashable, CustomStringConvertible {
        case network(IPNetwork)
        case host(String)

        public var description: String {
            switch self {
            case .network(let net): return net.description
            case .host(let host): return host
            }
        }
    }

    public var `default`: Default
    public var allow: [Rule]
    public var deny: [Rule]

    public init(default: Default = .public, allow: [Rule] = [], deny: [Rule] = []) {
        self.default = `default`
        self.allow = allow
        self.deny = deny
    }
}

public struct GuestSpec: Sendable, Hashable {
    public enum Image: Sendable, Hashable {
        case builtin
        case kernel(kernel: String, initrd: String?, disk: String?)
    }

    public enum Accel: String, Sendable, Hashable, CaseIterable {
        case auto, kvm, tcg
    }

    public var image: Image
    public var cmdline: String?
    public var memoryMiB: Int
    public var vcpus: Int
    public var accel: Accel
    /// Plain (non-secret) environment, in file order.
    public var env: [EnvironmentEntry]
    public var command: [String]?

    public init(
        image: Image = .builtin, cmdline: String? = nil, memoryMiB: Int = 512, vcpus: Int = 1,
        accel: Accel = .auto, env: [EnvironmentEntry] = [], command: [String]? = nil
    ) {
        self.image = image
        self.cmdline = cmdline
        self.memoryMiB = memoryMiB
        self.vcpus = vcpus
        self.accel = accel
        self.env = env
        self.command = command
    }
}

public struct EnvironmentEntry: Sendable, Hashable {
    public var name: String
    public var value: String

    public init(name: String, value: String) {
        self.name = name
        self.value = value
    }
}
