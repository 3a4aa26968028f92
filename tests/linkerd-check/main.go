// Command linkerd-check judges an issuer certificate, its key and a trust bundle the way
// Linkerd does, so integration tests can ask "would Linkerd accept what the daemon published?".
//
// The Linkerd Go module (github.com/linkerd/linkerd2) is not served by the module proxy this
// project can reach, so this helper cannot import it. Instead it re-implements, with the Go
// standard library only, the three code paths that decide acceptance, following Linkerd's
// sources step by step and reproducing their error texts (file names below are in
// linkerd/linkerd2):
//
//  1. install/upgrade/`linkerd check`: pkg/issuercerts/issuercerts.go
//     IssuerCertData.VerifyAndBuildCreds (with pkg/tls/cred.go ValidateAndCreateCreds and
//     pkg/tls/codec.go DecodePEMCertPool);
//  2. the identity controller loading the issuer: pkg/identity/service.go
//     Service.Initialize -> loadCredentials (parse key+cert, x509 Verify against the anchors
//     with no DNS name, require IsCA);
//  3. the identity controller certifying a proxy: Service.Certify -> checkCSR ->
//     pkg/tls/ca.go CA.IssueEndEntityCrt (ECDSA-SHA256, 24h lifetime plus 10s clock skew,
//     clamped to the issuer chain's first expiry), then the proxy's view: the leaf must
//     verify against the bundle for its identity name.
//
// Exit status 0: every check passed (each printed as "ok: ..."). Exit status 1: the first
// failing check, printed as "FAIL <stage>: <Linkerd's error text>". Exit status 2: usage.
package main

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"flag"
	"fmt"
	"math/big"
	"os"
	"time"
)

const (
	// pkg/identity/service.go DefaultIssuanceLifetime and pkg/tls/ca.go DefaultClockSkewAllowance.
	issuanceLifetime   = 24 * time.Hour
	clockSkewAllowance = 10 * time.Second
	// pkg/issuercerts/issuercerts.go expirationWarningThresholdInDays (a warning, not a failure).
	expiryWarningDays = 60
)

// cred is an issuer certificate with its chain (root first, as Linkerd stores it) and key.
type cred struct {
	cert  *x509.Certificate
	chain []*x509.Certificate
	key   crypto.Signer
}

func main() {
	bundlePath := flag.String("bundle", "", "trust bundle PEM (the trust anchors)")
	crtPath := flag.String("issuer-crt", "", "issuer certificate PEM (leaf first, then chain)")
	keyPath := flag.String("issuer-key", "", "issuer private key PEM")
	expectedName := flag.String("expected-name", "identity.linkerd.cluster.local",
		"issuer name the identity controller expects (used only in its error messages)")
	identity := flag.String("identity", "default.default.serviceaccount.identity.linkerd.cluster.local",
		"proxy identity to certify in the issuance check")
	flag.Parse()
	if *bundlePath == "" || *crtPath == "" || *keyPath == "" {
		fmt.Fprintln(os.Stderr, "usage: linkerd-check --bundle FILE --issuer-crt FILE --issuer-key FILE")
		os.Exit(2)
	}
	bundle, crtPEM, keyPEM := mustRead(*bundlePath), mustRead(*crtPath), mustRead(*keyPath)

	creds, err := verifyAndBuildCreds(bundle, crtPEM, keyPEM)
	check("install (issuercerts.VerifyAndBuildCreds)", err)
	fmt.Printf("ok: install/upgrade accept the issuer %q (expires %s)\n",
		creds.cert.Subject.CommonName, creds.cert.NotAfter.UTC().Format(time.RFC3339))
	if time.Now().AddDate(0, 0, expiryWarningDays).After(creds.cert.NotAfter) {
		fmt.Printf("warning: issuer cert will expire on %s (linkerd check warns under %d days)\n",
			creds.cert.NotAfter.UTC().Format(time.RFC3339), expiryWarningDays)
	}

	anchors, err := decodePEMCertPool(bundle)
	check("identity (trust anchors)", err)
	issuer, err := loadCredentials(anchors, crtPEM, keyPEM, *expectedName)
	check("identity (Service.Initialize)", err)
	fmt.Println("ok: identity controller loads the issuer against the trust anchors")

	leaf, err := certify(issuer, anchors, *identity)
	check("issuance (Service.Certify)", err)
	fmt.Printf("ok: issued proxy cert for %s valid until %s verifies against the bundle\n",
		*identity, leaf.NotAfter.UTC().Format(time.RFC3339))
}

func mustRead(path string) string {
	b, err := os.ReadFile(path)
	if err != nil {
		fmt.Fprintf(os.Stderr, "linkerd-check: %s\n", err)
		os.Exit(2)
	}
	return string(b)
}

func check(stage string, err error) {
	if err != nil {
		fmt.Printf("FAIL %s: %s\n", stage, err)
		os.Exit(1)
	}
}

// verifyAndBuildCreds mirrors pkg/issuercerts IssuerCertData.VerifyAndBuildCreds.
func verifyAndBuildCreds(anchorsPEM, crtPEM, keyPEM string) (*cred, error) {
	c, err := validateAndCreateCreds(crtPEM, keyPEM)
	if err != nil {
		return nil, fmt.Errorf("failed to read CA: %s", err)
	}
	if err := checkCertValidityPeriod(c.cert); err != nil {
		return nil, err
	}
	if err := checkCertAlgoRequirements(c.cert); err != nil {
		return nil, err
	}
	if !c.cert.IsCA {
		return nil, errors.New("issuer cert is not a CA")
	}
	anchors, err := decodePEMCertPool(anchorsPEM)
	if err != nil {
		return nil, err
	}
	if err := c.verify(anchors, ""); err != nil {
		return nil, err
	}
	return c, nil
}

// loadCredentials mirrors pkg/identity Service.loadCredentials: parse, verify the issuer
// against the anchors with no DNS name (it is a CA, not a leaf), require a CA.
func loadCredentials(anchors *x509.CertPool, crtPEM, keyPEM, expectedName string) (*cred, error) {
	c, err := validateAndCreateCreds(crtPEM, keyPEM)
	if err != nil {
		return nil, fmt.Errorf("failed to read CA from disk: %s", err)
	}
	if err := c.verify(anchors, ""); err != nil {
		return nil, fmt.Errorf("failed to verify issuer credentials for '%s' with trust anchors: %s",
			expectedName, err)
	}
	if !c.cert.IsCA {
		return nil, fmt.Errorf("failed to verify issuer credentials for '%s': not a CA", expectedName)
	}
	return c, nil
}

// certify mirrors Service.Certify for a proxy: the issuer must still verify, the CSR must
// pass checkCSR, the CA signs it (pkg/tls/ca.go), and the proxy must be able to verify
// the result against its trust anchors.
func certify(issuer *cred, anchors *x509.CertPool, identity string) (*x509.Certificate, error) {
	if err := issuer.verify(anchors, ""); err != nil { // ensureIssuerStillValid
		return nil, err
	}
	proxyKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader) // proxies use P-256
	if err != nil {
		return nil, err
	}
	csrDER, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{
		Subject:  pkix.Name{CommonName: identity},
		DNSNames: []string{identity},
	}, proxyKey)
	if err != nil {
		return nil, err
	}
	csr, err := x509.ParseCertificateRequest(csrDER)
	if err != nil {
		return nil, err
	}
	if err := checkCSR(csr, identity); err != nil {
		return nil, err
	}
	leaf, err := issueEndEntityCrt(issuer, csr)
	if err != nil {
		return nil, err
	}
	// The proxy gets leaf + issuer chain and trusts only the anchors.
	intermediates := x509.NewCertPool()
	intermediates.AddCert(issuer.cert)
	for _, c := range issuer.chain {
		intermediates.AddCert(c)
	}
	_, err = leaf.Verify(x509.VerifyOptions{
		Roots: anchors, Intermediates: intermediates, DNSName: identity,
		KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	})
	if err != nil {
		return nil, fmt.Errorf("issued certificate does not verify against the trust anchors: %s", err)
	}
	return leaf, nil
}

// issueEndEntityCrt mirrors pkg/tls CA.IssueEndEntityCrt with Linkerd's certificate template.
func issueEndEntityCrt(issuer *cred, csr *x509.CertificateRequest) (*x509.Certificate, error) {
	pub, ok := csr.PublicKey.(*ecdsa.PublicKey)
	if !ok {
		return nil, fmt.Errorf("CSR must contain an ECDSA public key: %+v", csr.PublicKey)
	}
	now := time.Now()
	notAfter := now.Add(issuanceLifetime).Add(clockSkewAllowance)
	// Clamp to the first expiry in the issuer's chain, as Linkerd does.
	first := issuer.cert.NotAfter
	for _, c := range issuer.chain {
		if c.NotAfter.Before(first) {
			first = c.NotAfter
		}
	}
	if first.Before(notAfter) {
		notAfter = first
	}
	template := &x509.Certificate{
		SerialNumber:       big.NewInt(1),
		SignatureAlgorithm: x509.ECDSAWithSHA256, // the only algorithm Linkerd signs with
		NotBefore:          now.Add(-clockSkewAllowance),
		NotAfter:           notAfter,
		PublicKey:          pub,
		KeyUsage:           x509.KeyUsageKeyEncipherment | x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{
			x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth,
		},
		Issuer:          issuer.cert.Subject,
		Subject:         csr.Subject,
		ExtraExtensions: csr.ExtraExtensions,
		DNSNames:        csr.DNSNames,
	}
	der, err := x509.CreateCertificate(rand.Reader, template, issuer.cert, pub, issuer.key)
	if err != nil {
		return nil, err
	}
	return x509.ParseCertificate(der)
}

// checkCSR mirrors pkg/identity checkCSR.
func checkCSR(csr *x509.CertificateRequest, identity string) error {
	if len(csr.DNSNames) != 1 {
		return errors.New("CSR must have exactly one DNSName")
	}
	if csr.DNSNames[0] != identity {
		return fmt.Errorf("CSR name does not match requested identity: csr=%s; req=%s",
			csr.DNSNames[0], identity)
	}
	switch csr.Subject.CommonName {
	case "", identity:
	default:
		return fmt.Errorf("invalid CommonName: %s", csr.Subject.CommonName)
	}
	return nil
}

// validateAndCreateCreds mirrors pkg/tls ValidateAndCreateCreds: the key may be EC, RSA
// (PKCS#1) or PKCS#8, and must match the first certificate; the rest is the chain.
func validateAndCreateCreds(crtPEM, keyPEM string) (*cred, error) {
	key, err := decodePEMKey(keyPEM)
	if err != nil {
		return nil, err
	}
	certs, err := decodePEMCertificates(crtPEM)
	if err != nil {
		return nil, err
	}
	if len(certs) == 0 {
		return nil, errors.New("No certificates found")
	}
	if !keyMatches(key, certs[0]) {
		return nil, errors.New("tls: Public and private key do not match")
	}
	// Linkerd stores the chain root first; the PEM lists it leaf first.
	chain := make([]*x509.Certificate, 0, len(certs)-1)
	for i := len(certs) - 1; i >= 1; i-- {
		chain = append(chain, certs[i])
	}
	return &cred{cert: certs[0], chain: chain, key: key}, nil
}

func decodePEMKey(txt string) (crypto.Signer, error) {
	block, _ := pem.Decode([]byte(txt))
	if block == nil {
		return nil, errors.New("Not PEM-encoded")
	}
	switch block.Type {
	case "EC PRIVATE KEY":
		return x509.ParseECPrivateKey(block.Bytes)
	case "RSA PRIVATE KEY":
		return x509.ParsePKCS1PrivateKey(block.Bytes)
	case "PRIVATE KEY":
		k, err := x509.ParsePKCS8PrivateKey(block.Bytes)
		if err != nil {
			return nil, err
		}
		signer, ok := k.(crypto.Signer)
		if !ok {
			return nil, fmt.Errorf("unsupported PKCS#8 key type %T", k)
		}
		return signer, nil
	default:
		return nil, fmt.Errorf("unsupported block type %s", block.Type)
	}
}

func keyMatches(key crypto.Signer, cert *x509.Certificate) bool {
	switch k := key.(type) {
	case *ecdsa.PrivateKey:
		pub, ok := cert.PublicKey.(*ecdsa.PublicKey)
		return ok && pub.X.Cmp(k.X) == 0 && pub.Y.Cmp(k.Y) == 0
	case *rsa.PrivateKey:
		pub, ok := cert.PublicKey.(*rsa.PublicKey)
		return ok && pub.N.Cmp(k.N) == 0 && pub.E == k.E
	default:
		return false
	}
}

// decodePEMCertificates mirrors pkg/tls DecodePEMCertificates, quirks included: text that is
// not PEM (e.g. trailing junk) is an error, and the first non-CERTIFICATE block ends parsing.
func decodePEMCertificates(txt string) ([]*x509.Certificate, error) {
	var certs []*x509.Certificate
	buf := []byte(txt)
	for len(buf) > 0 {
		block, rest := pem.Decode(buf)
		if block == nil {
			return certs, errors.New("not a PEM certificate")
		}
		if block.Type != "CERTIFICATE" {
			break
		}
		c, err := x509.ParseCertificate(block.Bytes)
		if err != nil {
			return certs, err
		}
		certs = append(certs, c)
		buf = rest
	}
	return certs, nil
}

// decodePEMCertPool mirrors pkg/tls DecodePEMCertPool.
func decodePEMCertPool(txt string) (*x509.CertPool, error) {
	certs, err := decodePEMCertificates(txt)
	if err != nil {
		return nil, err
	}
	if len(certs) == 0 {
		return nil, errors.New("No certificates found")
	}
	pool := x509.NewCertPool()
	for _, c := range certs {
		pool.AddCert(c)
	}
	return pool, nil
}

// verify mirrors pkg/tls Crt.Verify: the chain in the PEM serves as intermediates, the
// current time is used, and no DNS name is checked for an issuer.
func (c *cred) verify(roots *x509.CertPool, name string) error {
	intermediates := x509.NewCertPool()
	for _, ch := range c.chain {
		intermediates.AddCert(ch)
	}
	_, err := c.cert.Verify(x509.VerifyOptions{Roots: roots, Intermediates: intermediates, DNSName: name})
	return err
}

// checkCertValidityPeriod mirrors pkg/issuercerts CheckCertValidityPeriod.
func checkCertValidityPeriod(cert *x509.Certificate) error {
	if cert.NotBefore.After(time.Now()) {
		return fmt.Errorf("not valid before: %s", cert.NotBefore.Format(time.RFC3339))
	}
	if cert.NotAfter.Before(time.Now()) {
		return fmt.Errorf("not valid anymore. Expired on %s", cert.NotAfter.Format(time.RFC3339))
	}
	return nil
}

// checkCertAlgoRequirements mirrors pkg/issuercerts CheckCertAlgoRequirements: the issuer key
// must be ECDSA P-256 (Linkerd only signs with ECDSA-SHA256).
func checkCertAlgoRequirements(cert *x509.Certificate) error {
	if cert.PublicKeyAlgorithm != x509.ECDSA {
		return fmt.Errorf("must use ECDSA for public key algorithm, instead %s was used",
			cert.PublicKeyAlgorithm)
	}
	k, ok := cert.PublicKey.(*ecdsa.PublicKey)
	if !ok {
		return fmt.Errorf("expected ecdsa.PublicKey but got something %v", cert.PublicKey)
	}
	if k.Params().BitSize != 256 {
		return fmt.Errorf("must use P-256 curve for public key, instead P-%d was used",
			k.Params().BitSize)
	}
	// The issuer's own key must be ECDSA P-256, but since linkerd2 PR #8868 (2.12) its
	// signer may be an RSA trust anchor, so SHA256-RSA is accepted as well (REFERENCE.md).
	switch cert.SignatureAlgorithm {
	case x509.ECDSAWithSHA256, x509.SHA256WithRSA:
		return nil
	default:
		return fmt.Errorf("must be signed by an ECDSA P-256 key, instead %s was used",
			cert.SignatureAlgorithm)
	}
}
