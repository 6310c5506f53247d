public import KeyholePolicy

/// The network side of a sandbox or appliance: its secrets and what happens on a violation.
public struct NetworkSettings: Sendable, Hashable {
    public var secrets: [SecretEntry] = []
    /// Default `.block`.
    public var onSecretViolation: ViolationAction = .block
    /// What the guest gets for a blocked request: `.reset` (default) or an HTTP `403`.
    public var blockResponse: BlockResponse = .reset
    /// Extra PEM trust roots (file paths) for verifying upstream servers.
    public var upstreamCA: [String] = []
    /// The trusted resolvers the guest's DNS goes to (default: the host's nameservers).
    public var dns: [String] = []
    /// Hosts (or `*.domain`) whose TLS is relayed untouched, for certificate-pinned clients.
    public var tlsBypass: [String] = []
    /// The address (with its prefix) Keyhole puts on the guest-facing interface, such as
    /// `10.0.2.1/30`; a sandbox picks a free one when it is nil.
    public var gateway: String?

    public init() {}

    var document: PolicyDocument {
        var entries: [(key: String, value: PolicyDocument)] = [
            ("on_secret_violation", .string(onSecretViolation.rawValue)), ("block_response", .string(blockResponse.rawValue)),
        ]
        if !upstreamCA.isEmpty { entries.append(("upstream_ca", .strings(upstreamCA))) }
        if !dns.isEmpty { entries.append(("dns", .strings(dns))) }
        if !tlsBypass.isEmpty { entries.append(("tls_bypass", .strings(tlsBypass))) }
        if let gateway { entries.append(("gateway", .string(gateway))) }
        return .map(entries)
    }
}

/// What every builder that takes secrets shares (`SandboxBuilder`, `ApplianceBuilder`,
/// `NetworkBuilder`): the settings so far, and the setters of the reference pages, each
/// returning the same builder.
public protocol SecretsConfigurable: AnyObject {
    /// The network settings the builder holds so far.
    var networkSettings: NetworkSettings { get set }
}

extension SecretsConfigurable {
    /// Adds a secret configured by `SecretBuilder`.
    @discardableResult public func secret(_ configure: (SecretBuilder) throws -> SecretBuilder) rethrows -> Self {
        networkSettings.secrets.append(try configure(SecretBuilder()).build())
        return self
    }

    /// Adds a secret.
    @discardableResult public func secret(_ entry: SecretEntry) -> Self {
        networkSettings.secrets.append(entry)
        return self
    }

    /// A secret with the placeholder `$MSB_<envVar>`, allowed for one host.
    @discardableResult public func secretEnv(_ envVar: String, value: String, allowedHost: String) -> Self {
        secret(SecretEntry(envVar: envVar, value: value, allowedHosts: [allowedHost]))
    }

    /// `secretEnv(envVar, value, allowedHost)`, positionally, as the reference pages write it.
    @discardableResult public func secretEnv(_ envVar: String, _ value: String, _ allowedHost: String) -> Self {
        secretEnv(envVar, value: value, allowedHost: allowedHost)
    }

    /// The action for a placeholder sent where it may not go. Default `.block`.
    @discardableResult public func onSecretViolation(_ action: ViolationAction) -> Self {
        networkSettings.onSecretViolation = action
        return self
    }
}

/// Builders with a network of their own to configure (`SandboxBuilder`, `ApplianceBuilder`).
public protocol NetworkConfigurable: SecretsConfigurable {}

extension NetworkConfigurable {
    /// The network: secrets, the violation action, trust roots, resolvers.
    @discardableResult public func network(_ configure: (NetworkBuilder) throws -> NetworkBuilder) rethrows -> Self {
        networkSettings = try configure(NetworkBuilder(networkSettings)).networkSettings
        return self
    }
}

/// Builds `NetworkSettings`; used inside `SandboxBuilder.network { … }` and
/// `ApplianceBuilder.network { … }`. Every setter returns the same builder.
///
/// ```swift
/// .network { $0.onSecretViolation(.blockAndLog).secretEnv("API_KEY", value: key, placeholder: "$API_KEY", allowedHost: "api.example.com") }
/// ```
public final class NetworkBuilder: SecretsConfigurable {
    public var networkSettings: NetworkSettings

    public init(_ settings: NetworkSettings = NetworkSettings()) { networkSettings = settings }

    /// A secret with an explicit placeholder, allowed for one host.
    @discardableResult public func secretEnv(_ envVar: String, value: String, placeholder: String, allowedHost: String) -> NetworkBuilder {
        secret(SecretEntry(envVar: envVar, value: value, placeholder: placeholder, allowedHosts: [allowedHost]))
    }

    /// `secretEnv(envVar, value, placeholder, allowedHost)`, positionally, as the reference pages write it.
    @discardableResult public func secretEnv(_ envVar: String, _ value: String, _ placeholder: String, _ allowedHost: String) -> NetworkBuilder {
        secretEnv(envVar, value: value, placeholder: placeholder, allowedHost: allowedHost)
    }

    /// What the guest gets for a blocked request: `.reset` (default) or `.http` (a `403`
    /// with a JSON reason, where Keyhole can still answer).
    @discardableResult public func blockResponse(_ response: BlockResponse) -> NetworkBuilder {
        networkSettings.blockResponse = response
        return self
    }

    /// An extra PEM trust root for verifying upstream servers.
    @discardableResult public func upstreamCA(_ path: String) -> NetworkBuilder {
        networkSettings.upstreamCA.append(path)
        return self
    }

    /// A trusted resolver for the guest's DNS.
    @discardableResult public func dns(_ address: String) -> NetworkBuilder {
        networkSettings.dns.append(address)
        return self
    }

    /// The address Keyhole puts on the guest-facing interface (`10.0.2.1/30`).
    @discardableResult public func gateway(_ address: String) -> NetworkBuilder {
        networkSettings.gateway = address
        return self
    }

    /// A host (or `*.domain`) whose TLS is relayed untouched.
    @discardableResult public func tlsBypass(_ host: String) -> NetworkBuilder {
        networkSettings.tlsBypass.append(host)
        return self
    }
}
