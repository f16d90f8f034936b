;;; rlm-features-tests.el --- ERT tests of issue 12's bugs and features  -*- lexical-binding: t; -*-

;;; Commentary:

;; Against the real daemon and the scripted model (tests/test_emacs.py)
;; where the daemon has the feature; against `rlm-peer' (a scripted
;; JSON-RPC server on a real Unix socket, tests/elisp/rlm-peer.el) for
;; the protocol additions whose daemon side is on other branches:
;; phase events, sources/supported, follow_up, repl/*, improve/*.

;;; Code:

(require 'ert)
(require 'cl-lib)
(require 'rlm)
(require 'rlm-menu)
(require 'rlm-repl)
(require 'rlm-improve)
(require 'ob-rlm)
(require 'rlm-tests)
(require 'rlm-peer)

(defun rlm-test-wait-running (job)
  "Wait until the daemon runs JOB."
  (should (rlm-test-wait-for
           (lambda () (seq-contains-p (plist-get (rlm-request 'query/jobs) :jobs)
                                      (rlm-job-id job)))
           10)))

(defun rlm-test-header (job)
  "Return the header line of JOB's result buffer."
  (with-current-buffer (rlm-job-buffer job) (rlm--header-line)))

;;;; Bugs

(ert-deftest rlm-test-bug1-cancelled-babel-block-says-so ()
  (rlm-test-with-daemon
    (with-temp-buffer
      (insert "* Notes\n#+begin_src rlm :async yes\nslowtest: forever\n#+end_src\n")
      (org-mode)
      (goto-char (point-min))
      (search-forward "#+begin_src")
      (let ((org-confirm-babel-evaluate nil)) (org-babel-execute-src-block))
      (let ((job (car rlm--recent-jobs)))
        (rlm-test-wait-running job)
        (rlm-cancel-job job "by the test")
        (should (rlm-test-wait-for
                 (lambda () (string-match-p ": rlm: the block was cancelled (by the test)"
                                            (buffer-string)))
                 10))
        (should-not (string-match-p "error: nil" (buffer-string)))
        (with-current-buffer "*Messages*"
          (should (string-match-p "rlm: the block was cancelled" (buffer-string))))))
    ;; Synchronous: a timed-out block says it was cancelled, not "nil".
    (let ((err (should-error (rlm-query-sync "slowtest: sync" :text "t" :timeout 1)
                             :type 'rlm-error)))
      (should (equal (error-message-string err) "rlm: query cancelled (timed out)")))))

(ert-deftest rlm-test-bug2-c-g-asks-before-cancelling ()
  (rlm-test-with-daemon
    (with-temp-buffer
      (insert "text\n")
      (let* ((job (rlm-query "slowtest: keep going"))
             (asked 0))
        (rlm-test-wait-running job)
        (with-current-buffer (rlm-job-buffer job)
          (should (eq (key-binding (kbd "C-g")) #'rlm-cancel-or-quit))
          (cl-letf (((symbol-function 'y-or-n-p) (lambda (_) (cl-incf asked) nil)))
            (call-interactively (key-binding (kbd "C-g"))))
          (should (= asked 1))
          (should (rlm-job-running-p job))
          (cl-letf (((symbol-function 'y-or-n-p) (lambda (_) t)))
            (call-interactively (key-binding (kbd "C-g")))))
        (should (eq (rlm-job-state job) 'cancelled))))))

(ert-deftest rlm-test-bug3-best-effort-and-cached-from-the-daemon ()
  (rlm-test-with-daemon
    (with-temp-buffer
      (rename-buffer "rlm-test-flags" t)
      (insert "apples and pears\n")
      ;; One iteration cannot finish streamtest: the daemon forces an answer.
      (setq-local rlm-max-iterations 1)
      (let ((job (rlm-test-finish (rlm-query "streamtest: best effort please"))))
        (should (eq (rlm-job-state job) 'done))
        (should (equal (plist-get (rlm-job-options job) :max_iterations) 1))
        (should (rlm-job-best-effort-p job))
        (should (string-match-p "best effort" (rlm-test-header job)))
        (with-current-buffer (rlm-job-buffer job)
          (should (string-match-p "\\[best effort\\]" (buffer-string))))))))

(ert-deftest rlm-test-bug3-flags-sources-and-regenerate ()
  (let ((finishes (list (list :finish "cached" :supported t)
                        (list :finish "final" :supported :json-false)
                        (list :finish "final" :supported t))))
    (rlm-with-peer peer
        (list (cons "query/run"
                    (lambda (_peer _conn _id params)
                      (append (list :answer (format "answer %d" (length finishes))
                                    :job (plist-get params :job) :iterations 1
                                    :sub_calls 0 :tokens '(:input 1 :output 1)
                                    :cost 0 :elapsed_s 0.1 :trace "t" :root_model "m"
                                    :sources (vector (list :start 0 :end 5 :line 1
                                                           :text "hello")))
                              (pop finishes)))))
      (with-temp-buffer
        (rename-buffer "rlm-test-peer-flags" t)
        (insert "hello world\n")
        (let ((job (rlm-test-finish (rlm-query "cachedtest"))))
          (should (rlm-job-cached-p job))
          (should (string-match-p "rlm: done · cached · m" (rlm-test-header job)))
          (should (string-match-p "regenerate" (rlm-test-header job)))
          (with-current-buffer (rlm-job-buffer job)
            (should (string-match-p "\\[cached\\]" (buffer-string)))
            ;; g asks again, bypassing the cache, in the same buffer.
            (funcall (key-binding "g"))
            (let ((again rlm--job))
              (should-not (eq again job))
              (rlm-test-finish again)
              (should (eq (plist-get (plist-get (car (last (rlm-peer-requests-of peer "query/run")))
                                                :options)
                                     :cache)
                          :json-false))
              (should (rlm-job-unsupported-p again))
              (should (string-match-p "unsupported" (rlm-test-header again)))
              (should (string-match-p "\\[unsupported\\]" (buffer-string)))
              ;; Sources are buttons into the buffer asked about.
              (goto-char (point-min))
              (search-forward "Sources:")
              (let ((b (next-button (point))))
                (should b)
                (save-window-excursion
                  (button-activate b)
                  (should (equal (buffer-name) "rlm-test-peer-flags"))
                  (should (looking-at-p "hello")))))))))))

(ert-deftest rlm-test-bug4-error-messages-have-no-quotes ()
  (let* ((dir (make-temp-file "rlmq" t))
         (rlm-socket-path (expand-file-name "none.sock" dir))
         (rlm--connection nil)
         (rlm-daemon-command nil))
    (unwind-protect
        (let ((err (should-error (rlm-request 'daemon/status) :type 'rlm-error)))
          (should (string-prefix-p "rlm: no daemon answers on " (error-message-string err)))
          (should-not (string-match-p "\"" (error-message-string err)))
          ;; What the command loop shows, too.
          (should-not (string-match-p
                       "\"" (with-output-to-string
                              (let ((standard-output standard-output))
                                (princ (error-message-string err)))))))
      (delete-directory dir t))))

(ert-deftest rlm-test-bug5-stable-names-drop-on-kill-and-marks ()
  (rlm-test-with-daemon
    (let (names)
      (with-current-buffer (get-buffer-create "rlm-test-stable.org")
        (insert "* One\ntext one\n* Two\ntext two\n")
        (org-mode)
        (goto-char (point-max))
        (let ((job (rlm-test-finish (rlm-query "stabletest: ?"))))
          (should (equal (rlm-job-context job) "emacs:rlm-test-stable.org:Two"))
          (push (rlm-job-context job) names))
        ;; Editing the subtree updates the same context.
        (insert "more text\n")
        (let ((job (rlm-test-finish (rlm-query "stabletest: again?"))))
          (should (equal (rlm-job-context job) "emacs:rlm-test-stable.org:Two"))
          (should (string-match-p "more text" (rlm-test-context-text (rlm-job-context job)))))
        ;; An Org ID is the identity when there is one.
        (goto-char (point-min))
        (org-set-property "ID" "abc-123")
        (let ((job (rlm-test-finish (rlm-query "stabletest: by id?"))))
          (should (equal (rlm-job-context job) "emacs:rlm-test-stable.org#abc-123"))
          (push (rlm-job-context job) names))
        ;; Regions of any bounds share one name.
        (let ((transient-mark-mode t))
          (dolist (range '((1 5) (2 9)))
            (goto-char (car range)) (push-mark (cadr range) t t)
            (let ((job (rlm-test-finish (rlm-query "stabletest: region?"))))
              (should (equal (rlm-job-context job) "emacs:rlm-test-stable.org:region"))))))
      (push "emacs:rlm-test-stable.org:region" names)
      (dolist (n names) (should (member n (rlm-context-names))))
      ;; The contexts list says who made them and how old they are.
      (with-current-buffer (rlm-contexts)
        (goto-char (point-min))
        (should (re-search-forward "emacs:rlm-test-stable.org:Two .* [0-9]+s +[0-9]+s +this Emacs"
                                   nil t)))
      ;; Killing the buffer drops what it sent.
      (kill-buffer "rlm-test-stable.org")
      (should (rlm-test-wait-for
               (lambda () (not (cl-intersection names (rlm-context-names) :test #'equal)))
               10))
      ;; Several contexts marked and dropped at once.
      (rlm-put-text "rlm-test:m1" "a")
      (rlm-put-text "rlm-test:m2" "b")
      (rlm-put-text "rlm-test:m3" "c")
      (with-current-buffer (rlm-contexts)
        (dolist (n '("rlm-test:m1" "rlm-test:m3"))
          (goto-char (point-min))
          (re-search-forward (concat " " (regexp-quote n) " "))
          (rlm-contexts-mark-drop))
        (should (equal (rlm-contexts-marked) '("rlm-test:m1" "rlm-test:m3")))
        (rlm-contexts-drop-marked t))
      (let ((left (rlm-context-names)))
        (should-not (member "rlm-test:m1" left))
        (should-not (member "rlm-test:m3" left))
        (should (member "rlm-test:m2" left)))
      (rlm-drop "rlm-test:m2"))))

(ert-deftest rlm-test-bug6-prompt-says-what-is-sent-and-region-goes ()
  (rlm-test-with-daemon
    (with-temp-buffer
      (rename-buffer "rlm-test-prompt" t)
      (insert "0123456789\nabcdefghij\n")
      (let ((transient-mark-mode t) prompts)
        (goto-char 3) (push-mark 8 t t)
        (cl-letf (((symbol-function 'read-string)
                   (lambda (prompt &rest _) (push prompt prompts) "prompttest: ?")))
          (let ((job (call-interactively #'rlm-query)))
            (should (equal (car prompts) "Ask rlm about the region (5 chars): "))
            ;; Sent, then deactivated: the next question is about the buffer.
            (should-not (region-active-p))
            (rlm-test-finish job))
          (call-interactively #'rlm-query)
          (should (equal (car prompts) "Ask rlm about buffer rlm-test-prompt (22 chars): ")))
        (org-mode)
        (goto-char (point-min))
        (insert "* Heading A\n")
        (cl-letf (((symbol-function 'read-string)
                   (lambda (prompt &rest _) (push prompt prompts) "prompttest: ?")))
          (rlm-test-finish (call-interactively #'rlm-query))
          (should (string-prefix-p "Ask rlm about subtree “Heading A” (" (car prompts))))))))

(ert-deftest rlm-test-bug7-small-inconsistencies ()
  (rlm-test-with-daemon
    ;; rlm-query-subtree says what is wrong before asking anything.
    (with-temp-buffer
      (insert "before any heading\n* H\n")
      (org-mode)
      (goto-char (point-min))
      (let ((asked nil))
        (cl-letf (((symbol-function 'read-string) (lambda (&rest _) (setq asked t) "q")))
          (should-error (call-interactively #'rlm-query-subtree) :type 'user-error))
        (should-not asked)))
    ;; `+' in the contexts list does not say "Ask".
    (let ((dir (make-temp-file (expand-file-name "plus" rlm-test-tmp) t)) prompt)
      (with-temp-file (expand-file-name "f.txt" dir) (insert "x\n"))
      (with-current-buffer (rlm-contexts)
        (cl-letf (((symbol-function 'read-file-name)
                   (lambda (p &rest _) (setq prompt p) (expand-file-name "f.txt" dir))))
          (call-interactively #'rlm-contexts-add-files)))
      (should (string-prefix-p "Add " prompt))
      ;; Progress messages are cleared when the work is done.
      (let (calls)
        (cl-letf* ((orig (symbol-function 'message))
                   ((symbol-function 'message)
                    (lambda (&rest args) (push args calls) (apply orig args))))
          (rlm-files-context (list dir)))
        (should (string-match-p "the daemon is reading" (car (car (last calls)))))
        (should (equal (car calls) '(nil)))))
    ;; The header's turn is the buffer's last Turn, and the buffer is unmodified.
    (with-temp-buffer
      (insert "apples\n")
      (let ((job (rlm-test-finish (rlm-query "streamtest: turns?"))))
        (with-current-buffer (rlm-job-buffer job)
          (should-not (buffer-modified-p))
          (let ((last-turn (save-excursion
                             (goto-char (point-max))
                             (re-search-backward "^Turn \\([0-9]+\\)")
                             (match-string 1))))
            (should (string-match-p (concat "turn " last-turn " ") (rlm--header-line)))))))))

(ert-deftest rlm-test-bug8-daemon-log-keeps-the-previous-run ()
  (let* ((dir (make-temp-file "rlmlog" t))
         (rlm-socket-path (expand-file-name "none.sock" dir))
         (rlm-daemon-log-file (expand-file-name "rlmd.log" dir))
         (rlm--connection nil)
         (rlm-daemon-start-timeout 5))
    (unwind-protect
        (progn
          (dolist (word '("first-run" "second-run"))
            (let ((rlm-daemon-command (list "sh" "-c" (format "echo %s; exit 3" word))))
              (should-error (rlm-request 'daemon/status) :type 'rlm-error)
              (rlm-test-wait-for (lambda () (not (process-live-p rlm--daemon-process))) 5)
              (accept-process-output nil 0.2)))
          (with-temp-buffer
            (insert-file-contents rlm-daemon-log-file)
            (should (string-match-p "second-run" (buffer-string)))
            (should-not (string-match-p "first-run" (buffer-string))))
          (with-current-buffer (rlm-daemon-log)
            (should (derived-mode-p 'rlm-log-mode))
            (should (string-match-p "second-run\\(.\\|\n\\)*previous run\\(.\\|\n\\)*first-run"
                                    (buffer-string)))
            (should (string-match-p "drain" (buffer-string)))))
      (delete-directory dir t))))

(ert-deftest rlm-test-bug9-job-picker-is-annotated-newest-first ()
  (rlm-test-with-daemon
    (let* ((a (rlm-test-finish (rlm-start-query "pickertest: first" :display nil)))
           (b (rlm-test-finish (rlm-start-query "pickertest: second" :display nil)))
           (table (rlm-job-completion-table rlm--recent-jobs))
           (meta (cdr (funcall table "" nil 'metadata)))
           (sorted (funcall (alist-get 'display-sort-function meta)
                            (all-completions "" table))))
      (should (equal (seq-take sorted 2) (list (rlm-job-id b) (rlm-job-id a))))
      (let ((ann (funcall (alist-get 'annotation-function meta) (rlm-job-id a))))
        (should (string-match-p "done .* ago .*pickertest: first" ann))))))

(ert-deftest rlm-test-bug10-cancel-from-the-source-buffer ()
  (rlm-test-with-daemon
    (let ((ba (generate-new-buffer "rlm-test-src-a"))
          (bb (generate-new-buffer "rlm-test-src-b")))
      (unwind-protect
          (let ((ja (with-current-buffer ba (insert "a\n") (rlm-query "slowtest: a")))
                (jb (with-current-buffer bb (insert "b\n") (rlm-query "slowtest: b"))))
            (with-current-buffer ba (call-interactively #'rlm-cancel))
            (should (eq (rlm-job-state ja) 'cancelled))
            (should (rlm-job-running-p jb))
            (with-current-buffer bb (call-interactively #'rlm-cancel))
            (should (eq (rlm-job-state jb) 'cancelled)))
        (kill-buffer ba)
        (kill-buffer bb)))))

(ert-deftest rlm-test-bug11-phase-shows-during-the-first-token-wait ()
  (let (pending)
    (rlm-with-peer peer
        (list (cons "query/run"
                    (lambda (_peer conn id params)
                      (setq pending (list conn id (plist-get params :job)))
                      'defer)))
      (let ((job (rlm-start-query "phasetest" :display nil)))
        (should (rlm-test-wait-for (lambda () pending) 5))
        (pcase-let ((`(,conn ,id ,jid) pending))
          (should (string-match-p "rlm: thinking" (rlm-test-header job)))
          (rlm-peer-notify conn jid 0 '(:kind "phase" :phase "loading_model"))
          (should (rlm-test-wait-for
                   (lambda () (string-match-p "rlm: loading the model" (rlm-test-header job))) 5))
          (rlm-peer-notify conn jid 1 '(:kind "phase" :phase "prompt" :tokens 12345))
          (should (rlm-test-wait-for
                   (lambda () (string-match-p "rlm: reading the prompt: 12.3k tokens"
                                              (rlm-test-header job)))
                   5))
          ;; The first token ends the phase.
          (rlm-peer-notify conn jid 2 '(:kind "root_delta" :text "hi"))
          (should (rlm-test-wait-for
                   (lambda () (string-match-p "rlm: thinking" (rlm-test-header job))) 5))
          (rlm-peer-reply conn id (list :answer "ok" :job jid :iterations 1 :sub_calls 0
                                        :tokens '(:input 1 :output 1) :cost 0
                                        :elapsed_s 1 :trace "t"))
          (rlm-test-finish job)
          (should (equal (rlm-job-answer job) "ok")))))))

;;;; Features

(ert-deftest rlm-test-follow-up-sees-the-earlier-answer ()
  (let ((answers (make-hash-table :test #'equal)))
    (rlm-with-peer peer
        (list (cons "query/run"
                    (lambda (_peer _conn _id params)
                      (let* ((prev (plist-get params :follow_up))
                             (answer (if prev
                                         (format "Building on “%s”: more." (gethash prev answers))
                                       "First answer.")))
                        (puthash (plist-get params :job) answer answers)
                        (list :answer answer :job (plist-get params :job) :iterations 1
                              :sub_calls 0 :tokens '(:input 1 :output 1) :cost 0
                              :elapsed_s 0.1 :trace "t" :supported t
                              :sources (vector (list :start (if prev 6 0) :end (if prev 11 5)
                                                     :line 1
                                                     :text (if prev "world" "hello"))))))))
      (with-temp-buffer
        (rename-buffer "rlm-test-convo" t)
        (insert "hello world\n")
        (let* ((first (rlm-test-finish (rlm-query "followtest: first?")))
               (buf (rlm-job-buffer first)))
          (with-current-buffer buf
            (cl-letf (((symbol-function 'read-string) (lambda (&rest _) "and then?")))
              (call-interactively (key-binding (kbd "C-c C-c")))))
          (let* ((second (rlm-test-finish (with-current-buffer buf rlm--job)))
                 (sent (car (last (rlm-peer-requests-of peer "query/run")))))
            (should-not (eq second first))
            (should (equal (plist-get sent :follow_up) (rlm-job-id first)))
            (should (equal (plist-get sent :context) (rlm-job-context first)))
            (should (equal (rlm-job-answer second) "Building on “First answer.”: more."))
            ;; One buffer, in order, each answer with its own sources.
            (should (eq (rlm-job-buffer second) buf))
            (with-current-buffer buf
              (let ((text (buffer-string)))
                (should (< (string-match "Question: followtest: first?" text)
                           (string-match "First answer\\." text)
                           (string-match "hello" text (string-match "Sources:" text))
                           (string-match "Follow-up: and then?" text)
                           (string-match "Building on" text)
                           (string-match "world" text (string-match "Sources:" text
                                                                    (string-match "Building on" text)))))))
            (pcase-let ((`(buffer ,b ,pos ,_) (rlm-source-location second (car (rlm-job-sources second)))))
              (should (equal (buffer-name b) "rlm-test-convo"))
              (should (= pos 7)))))))))

(ert-deftest rlm-test-add-three-parts-sources-map-back ()
  (let ((file (make-temp-file (expand-file-name "part" rlm-test-tmp) nil ".txt"
                              "file line one\nthe NEEDLE-C is here\n")))
    (rlm-with-peer peer
        (list (cons "query/run"
                    (lambda (peer _conn _id params)
                      (let ((text (gethash (plist-get params :context) (rlm-peer-contexts peer)))
                            (sources nil))
                        (dolist (needle '("NEEDLE-A" "NEEDLE-B" "NEEDLE-C"))
                          (let ((start (string-search needle text)))
                            (push (list :start start :end (+ start (length needle))
                                        :line (1+ (cl-count ?\n (substring text 0 start)))
                                        :text needle)
                                  sources)))
                        (list :answer "Three needles." :job (plist-get params :job)
                              :iterations 1 :sub_calls 0 :tokens '(:input 1 :output 1)
                              :cost 0 :elapsed_s 0.1 :trace "t" :supported t
                              :sources (vconcat (nreverse sources)))))))
      (let ((a (generate-new-buffer "rlm-test-part-a"))
            (b (generate-new-buffer "rlm-test-part-b"))
            (transient-mark-mode t))
        (unwind-protect
            (progn
              (with-current-buffer a
                (insert "skip this\nregion with NEEDLE-A inside\nskip that\n")
                (goto-char 11) (push-mark 39 t t)
                (rlm-add))
              (with-current-buffer b
                (insert "whole buffer\nhas NEEDLE-B\n")
                (rlm-add))
              (rlm-add file)
              (should (= (length rlm--added-parts) 3))
              (let* ((job (rlm-test-finish (with-current-buffer b (rlm-query "partstest: ?"))))
                     (sent (gethash (rlm-job-context job) (rlm-peer-contexts peer)))
                     (locs (mapcar (lambda (s) (rlm-source-location job s)) (rlm-job-sources job))))
                ;; One context, a header per part.
                (should (equal (rlm-job-context job) "emacs:added"))
                (should (string-match-p "\\`===== Part 1 of 3: region of rlm-test-part-a, line 2 =====\n" sent))
                (should (string-match-p "===== Part 2 of 3: buffer rlm-test-part-b =====\n" sent))
                (should (string-match-p "===== Part 3 of 3: .*part.*\\.txt =====\nfile line one" sent))
                (should-not rlm--added-parts)   ; sent, then forgotten
                (pcase-let ((`((buffer ,ba ,pa ,_) (buffer ,bb ,pb ,_) (file ,f ,_ ,c)) locs))
                  (should (eq ba a))
                  (should (equal (with-current-buffer a (buffer-substring pa (+ pa 8))) "NEEDLE-A"))
                  (should (eq bb b))
                  (should (equal (with-current-buffer b (buffer-substring pb (+ pb 8))) "NEEDLE-B"))
                  (should (equal f file))
                  (should (= c (string-search "NEEDLE-C" "file line one\nthe NEEDLE-C is here\n"))))
                ;; The third button opens the file at the needle.
                (with-current-buffer (rlm-job-buffer job)
                  (goto-char (point-min))
                  (search-forward "3. ")
                  (save-window-excursion
                    (push-button)
                    (should (equal (buffer-file-name) file))
                    (should (looking-at-p "NEEDLE-C"))
                    (kill-buffer)))))
          (kill-buffer a)
          (kill-buffer b)
          (delete-file file))))))

(ert-deftest rlm-test-buffer-local-options-and-presets ()
  (rlm-test-with-daemon
    (rlm-define-preset 'rlm-test-tiny :max_iterations 1 :max_depth 1)
    (with-temp-buffer
      (insert "* Entry\n:PROPERTIES:\n:RLM_PRESET: rlm-test-tiny\n:RLM_MODEL: m\n:END:\ntext\n")
      (org-mode)
      (goto-char (point-max))
      (setq-local rlm-timeout 77)
      (let ((job (rlm-test-finish (rlm-query "presettest: ?"))))
        (should (equal (rlm-job-options job)
                       '(:timeout_s 77 :max_iterations 1 :max_depth 1 :root_model "m")))
        (should (eq (rlm-job-state job) 'done))
        (should (string-match-p " · m · " (rlm-test-header job)))))
    ;; Buffer-local: only in that buffer.
    (with-temp-buffer
      (let ((rlm-preset nil))
        (should (equal (rlm-effective-options) nil))
        (setq-local rlm-preset 'rlm-test-tiny)
        (should (equal (rlm-effective-options '(:max_iterations 5))
                       '(:max_iterations 5 :max_depth 1)))))
    (with-temp-buffer (should (equal (rlm-effective-options) nil)))))

(ert-deftest rlm-test-insert-at-point-is-one-undo-step ()
  (rlm-test-with-daemon
    (with-temp-buffer
      (buffer-enable-undo)
      (insert "Before.\nAfter.\n")
      (undo-boundary)
      (goto-char 9)
      (let ((job (rlm-query-insert "inserttest: answer here")))
        ;; The user types elsewhere meanwhile.
        (save-excursion (goto-char (point-min)) (insert "Typed. "))
        (undo-boundary)
        (rlm-test-finish job)
        (should (eq (rlm-job-state job) 'done))
        (should (equal (buffer-string) "Typed. Before.\nGeneric answer.After.\n"))
        ;; Point stayed on its text.
        (should (= (point) 16))
        ;; One undo step removes the whole answer, nothing else.
        (primitive-undo 1 (cl-member-if #'identity buffer-undo-list))
        (should (equal (buffer-string) "Typed. Before.\nAfter.\n"))
        ;; The trajectory is kept aside.
        (should (buffer-live-p (rlm-job-buffer job)))))))

(ert-deftest rlm-test-menu-arguments ()
  (rlm-test-with-daemon
    (should (equal (rlm-menu-options '("--root=m" "--iterations=3" "--no-cache" "--mode=rlm"))
                   '(:root_model "m" :mode "rlm" :max_iterations 3 :cache :json-false)))
    ;; The menu opens with this buffer's settings as its arguments.
    (with-temp-buffer
      (setq-local rlm-root-model "m")
      (setq-local rlm-max-iterations 3)
      (unwind-protect
          (progn
            (rlm-menu)
            (should (eq (oref transient--prefix command) 'rlm-menu))
            (should (equal (transient-args 'rlm-menu) '("--root=m" "--iterations=3"))))
        (transient--emergency-exit))
      (should-not transient--prefix))
    (with-temp-buffer
      (insert "menu text\n")
      (rlm-menu-save '("--root=m" "--time=50"))
      (should (equal rlm-root-model "m"))
      (should (local-variable-p 'rlm-root-model))
      (should (equal (rlm-menu--initial-args) '("--root=m" "--time=50")))
      (let ((job (rlm-test-finish (rlm-menu-run "menutest: ?" '("--context=buffer" "--iterations=4")))))
        (should (eq (rlm-job-state job) 'done))
        (let ((o (rlm-job-options job)))
          (should (= (length o) 6))
          (should (equal (plist-get o :root_model) "m"))
          (should (equal (plist-get o :max_iterations) 4))
          (should (equal (plist-get o :timeout_s) 50))))
      (let ((job (rlm-menu-run "menutest: insert" '("--context=buffer" "--insert"))))
        (rlm-test-finish job)
        (should (string-match-p "Generic answer\\." (buffer-string)))))))

(ert-deftest rlm-test-repl-buffer ()
  (rlm-with-peer peer
      (list (cons "repl/open" (lambda (&rest _) '(:session "s1")))
            (cons "repl/exec"
                  (lambda (_peer _conn _id params)
                    (let ((code (plist-get params :code)))
                      (if (string-match-p "boom" code)
                          '(:stdout "" :error "NameError: boom" :truncated :json-false :elapsed_s 0.1)
                        (list :stdout (format "ran %s\n" code) :error nil
                              :truncated :json-false :elapsed_s 0.1)))))
            (cons "repl/close" (lambda (&rest _) '(:closed t))))
    (let ((buf (rlm-repl "ctx")))
      (with-current-buffer buf
        (should (derived-mode-p 'rlm-repl-mode))
        (should (equal (rlm-peer-requests-of peer "repl/open") '((:context "ctx"))))
        (goto-char (point-max))
        (insert "x = len(context)")
        (comint-send-input)
        (should (rlm-test-wait-for (lambda () (string-match-p "ran x = len(context)\n>>> "
                                                              (buffer-string)))
                                   5))
        (goto-char (point-max))
        (insert "boom")
        (comint-send-input)
        (should (rlm-test-wait-for (lambda () (string-match-p "NameError: boom" (buffer-string))) 5))
        (should (equal (plist-get (car (rlm-peer-requests-of peer "repl/exec")) :session) "s1")))
      (kill-buffer buf)
      (should (rlm-test-wait-for (lambda () (rlm-peer-requests-of peer "repl/close")) 5))
      (should (equal (car (rlm-peer-requests-of peer "repl/close")) '(:session "s1"))))))

(defconst rlm-test-improve-diff
  "diff --git a/calc.py b/calc.py\n--- a/calc.py\n+++ b/calc.py\n@@ -1,2 +1,2 @@\n def add(a, b):\n-    return a - b\n+    return a + b\n"
  "The proposal of the scripted improvement cycle.")

(ert-deftest rlm-test-improve-review-buffer-and-keys ()
  (require 'magit)
  (let (starts)
    (rlm-with-peer peer
        (list (cons "improve/start"
                    (lambda (_peer conn id params)
                      (push (list conn id (plist-get params :job)) starts)
                      'defer))
              (cons "improve/reject"
                    (lambda (_peer _conn _id params)
                      (if (plist-get params :feedback)
                          (list :job (plist-get params :job) :state "awaiting_approval" :round 2
                                :diff rlm-test-improve-diff :summary "Fixed add."
                                :tests '(:passed t :output "1 passed" :elapsed_s 0.4))
                        '(:state "rejected"))))
              (cons "improve/approve"
                    (lambda (&rest _) '(:state "applied" :files ["calc.py"]))))
      (let ((buf (rlm-improve "make add add" rlm-test-tmp "pytest -q" "python bench.py" 3)))
        (should (rlm-test-wait-for (lambda () starts) 5))
        (pcase-let ((`(,conn ,id ,job) (car starts)))
          (should (equal (plist-get (car (rlm-peer-requests-of peer "improve/start")) :test_command)
                         "pytest -q"))
          (rlm-peer-notify conn job 0 '(:kind "phase" :phase "analysis"))
          (should (rlm-test-wait-for
                   (lambda () (with-current-buffer buf
                                (string-match-p "analysis" (rlm-improve--header))))
                   5))
          (rlm-peer-reply conn id (list :job job :state "awaiting_approval" :round 1
                                        :diff rlm-test-improve-diff :summary "Changed add."
                                        :tests '(:passed :json-false :output "1 failed\nassert 3 == -1"
                                                         :elapsed_s 0.5)
                                        :bench '(:before 2.0 :after 1.5))))
        (with-current-buffer buf
          (should (rlm-test-wait-for (lambda () (equal rlm-improve--state "awaiting_approval")) 5))
          (should (derived-mode-p 'rlm-improve-mode 'diff-mode))
          ;; With Magit (required above), Magit's faces.
          (should (assq 'diff-added face-remapping-alist))
          (let ((text (buffer-string)))
            (should (string-match-p "Tests: FAILED in 0.5 s" text))
            (should (string-match-p "Benchmark: 2.0 → 1.5 (-25.0%)" text))
            (should (string-match-p "Test output:\n    1 failed\n    assert 3 == -1" text))
            (should (string-match-p "^\\+    return a \\+ b$" text)))
          ;; diff-mode finds the hunk.
          (goto-char (point-min))
          (diff-hunk-next)
          (should (looking-at-p "@@ -1,2 \\+1,2 @@"))
          ;; C-c C-r: reject with feedback; the next round comes back.
          (cl-letf (((symbol-function 'read-string) (lambda (&rest _) "add, do not subtract")))
            (call-interactively (key-binding (kbd "C-c C-r"))))
          (should (rlm-test-wait-for (lambda () (equal (plist-get rlm-improve--decision :round) 2)) 5))
          (should (equal (plist-get (car (rlm-peer-requests-of peer "improve/reject")) :feedback)
                         "add, do not subtract"))
          (should (string-match-p "Tests: passed" (buffer-string)))
          ;; C-c C-c: approve.
          (call-interactively (key-binding (kbd "C-c C-c")))
          (should (equal rlm-improve--state "applied"))
          (should (string-match-p "Applied to the working tree (unstaged): calc.py" (buffer-string)))
          (should-error (call-interactively (key-binding (kbd "C-c C-c"))) :type 'user-error))
        ;; C-c C-k: reject.
        (let ((buf2 (rlm-improve "another" rlm-test-tmp)))
          (should (rlm-test-wait-for (lambda () (= (length starts) 2)) 5))
          (pcase-let ((`(,conn ,id ,job) (car starts)))
            (rlm-peer-reply conn id (list :job job :state "awaiting_approval" :round 1
                                          :diff rlm-test-improve-diff :summary "s"
                                          :tests '(:passed t :output "ok" :elapsed_s 0.1))))
          (with-current-buffer buf2
            (should (rlm-test-wait-for (lambda () (equal rlm-improve--state "awaiting_approval")) 5))
            (call-interactively (key-binding (kbd "C-c C-k")))
            (should (rlm-test-wait-for (lambda () (equal rlm-improve--state "rejected")) 5))
            (should (string-match-p "State: rejected" (buffer-string))))
          (kill-buffer buf2))
        (kill-buffer buf)))))


;;;; The same features against the real daemon (its side merged in)

(ert-deftest rlm-test-daemon-follow-up-and-sources ()
  (rlm-test-with-daemon
    (with-temp-buffer
      (rename-buffer "rlm-test-daemon-convo" t)
      (insert "Some notes.\nThe needle is 4242.\nMore notes.\n")
      (let* ((first (rlm-test-finish (rlm-query "convofirst: what is the word?")))
             (buf (rlm-job-buffer first)))
        (should (equal (rlm-job-answer first) "The secret word is pumpkin."))
        (with-current-buffer buf (rlm-follow-up "convofollow: say it again"))
        (let ((second (rlm-test-finish (with-current-buffer buf rlm--job))))
          (should (eq (rlm-job-state second) 'done))
          (should (equal (rlm-job-follow-up second) (rlm-job-id first)))
          (should (equal (rlm-job-answer second) "Following up."))
          (with-current-buffer buf
            (should (< (string-match "pumpkin" (buffer-string))
                       (string-match "Follow-up: convofollow" (buffer-string))
                       (string-match "Following up\\." (buffer-string)))))))
      ;; The daemon's sources map back into this buffer.
      (let* ((job (rlm-test-finish (rlm-query "sourcetest: what is the needle?")))
             (sources (rlm-job-sources job)))
        (should (eq (rlm-job-state job) 'done))
        (should sources)
        (pcase-let ((`(buffer ,b ,pos ,_) (rlm-source-location job (car sources))))
          (should (eq b (current-buffer)))
          (should (equal (buffer-substring-no-properties
                          pos (+ pos (- (plist-get (car sources) :end)
                                        (plist-get (car sources) :start))))
                         (substring (buffer-string)
                                    (plist-get (car sources) :start)
                                    (plist-get (car sources) :end))))
          (should (string-match-p "4242" (buffer-substring pos (line-end-position 2)))))))))

(ert-deftest rlm-test-daemon-repl ()
  (rlm-test-with-daemon
    (rlm-put-text "rlm-test:repl" "hello repl world")
    (let ((buf (rlm-repl "rlm-test:repl")))
      (with-current-buffer buf
        (goto-char (point-max))
        (insert "x = len(context)")
        (comint-send-input)
        (should (rlm-test-wait-for (lambda () (= 2 (how-many "^>>> " (point-min) (point-max)))) 30))
        (goto-char (point-max))
        (insert "print(x + 1)")
        (comint-send-input)
        (should (rlm-test-wait-for (lambda () (string-match-p "^17\n>>> " (buffer-string))) 30))
        (goto-char (point-max))
        (insert "undefined_name")
        (comint-send-input)
        (should (rlm-test-wait-for (lambda () (string-match-p "NameError" (buffer-string))) 30)))
      (let ((session (buffer-local-value 'rlm-repl--session buf)))
        (kill-buffer buf)
        (should (rlm-test-wait-for
                 (lambda () (not (cl-find session (plist-get (rlm-request 'repl/list) :sessions)
                                          :key (lambda (s) (plist-get s :session))
                                          :test #'equal)))
                 10))))
    (rlm-drop "rlm-test:repl")))

(ert-deftest rlm-test-daemon-improve-cycle-and-approve ()
  (rlm-test-with-daemon
    (let* ((repo (make-temp-file (expand-file-name "improve" rlm-test-tmp) t))
           (default-directory (file-name-as-directory repo))
           (git (lambda (&rest args)
                  (with-temp-buffer
                    (apply #'call-process "git" nil t nil
                           "-c" "user.email=t@e" "-c" "user.name=t" args)
                    (buffer-string))))
           (python (or (getenv "RLM_TEST_PYTHON") "python3")))
      (with-temp-file "calc.py" (insert "def add(a, b):\n    return a - b\n"))
      (with-temp-file "test_calc.py"
        (insert "from calc import add\nassert add(2, 3) == 5\nprint('ok: add works')\n"))
      (funcall git "init" "-q")
      (funcall git "add" ".")
      (funcall git "commit" "-qm" "init")
      (let ((head (funcall git "rev-parse" "HEAD"))
            (buf (rlm-improve "improvetest: make add add" repo
                              (format "%s test_calc.py" python) nil 2)))
        (with-current-buffer buf
          (should (rlm-test-wait-for (lambda () (member rlm-improve--state
                                                        '("awaiting_approval" "failed")))
                                     90))
          (should (equal rlm-improve--state "awaiting_approval"))
          (should (string-match-p "Tests: passed" (buffer-string)))
          (should (string-match-p "ok: add works" (buffer-string)))
          (should (string-match-p "^\\+    return a \\+ b$" (buffer-string)))
          ;; Nothing changed before approval.
          (should (equal (with-temp-buffer (insert-file-contents (expand-file-name "calc.py" repo))
                                           (buffer-string))
                         "def add(a, b):\n    return a - b\n"))
          ;; RET on a hunk opens the repository's file, as in any diff.
          (goto-char (point-min))
          (re-search-forward "^\\+    return a \\+ b$")
          (save-window-excursion
            (diff-goto-source)
            (should (equal (buffer-file-name) (expand-file-name "calc.py" repo)))
            (kill-buffer))
          (call-interactively (key-binding (kbd "C-c C-c")))
          (should (equal rlm-improve--state "applied")))
        (should (string-match-p "return a \\+ b"
                                (with-temp-buffer
                                  (insert-file-contents (expand-file-name "calc.py" repo))
                                  (buffer-string))))
        ;; Unstaged, never committed.
        (should (equal (funcall git "rev-parse" "HEAD") head))
        (should (string-match-p "^ M calc.py" (funcall git "status" "--porcelain")))
        (kill-buffer buf))
      (delete-directory repo t))))

;; A buffer of joined files (`head' headers): the sources name those files,
;; but the text came from this buffer, so the button goes back into it.
(ert-deftest rlm-test-daemon-sources-of-joined-files-stay-in-the-buffer ()
  (rlm-test-with-daemon
    (with-temp-buffer
      (rename-buffer "rlm-test-daemon-joined" t)
      (insert "==> a.txt <==\nnothing here\n\n==> b.txt <==\nfirst line\n"
              "The needle is 4242.\n")
      (let* ((job (rlm-test-finish (rlm-query "sourcetest: which file has the needle?")))
             (source (car (rlm-job-sources job))))
        (should (equal (plist-get source :file) "b.txt"))
        (should (equal (plist-get source :file_line) 2))
        (pcase-let ((`(buffer ,b ,pos ,_) (rlm-source-location job source)))
          (should (eq b (current-buffer)))
          (should (string-prefix-p "The needle is 4242"
                                   (buffer-substring-no-properties pos (point-max)))))))))

(ert-deftest rlm-test-daemon-sources-of-a-directory-open-file-and-line ()
  (rlm-test-with-daemon
    (let ((dir (make-temp-file (expand-file-name "srcdir" rlm-test-tmp) t)))
      (with-temp-file (expand-file-name "a.txt" dir) (insert "nothing here\n"))
      (with-temp-file (expand-file-name "b.txt" dir)
        (insert "first line\nsecond line\nThe needle is 4242.\n"))
      (let* ((job (rlm-test-finish (rlm-query-files "sourcetest: where is the needle?"
                                                    (list dir))))
             (source (cl-find-if (lambda (s) (plist-get s :file)) (rlm-job-sources job))))
        (should source)
        (pcase-let ((`(file ,file ,line ,_) (rlm-source-location job source)))
          (should (equal file (expand-file-name "b.txt" dir)))
          (should (= line 3))
          (save-window-excursion
            (rlm-visit-source (rlm-source-location job source))
            (should (looking-at-p "The needle is 4242"))
            (kill-buffer)))))))

;; The daemon's own phase events: the prompt phase of each turn, here
;; followed by a model that never sends its first token.
(ert-deftest rlm-test-daemon-phase-while-waiting-for-the-first-token ()
  (rlm-test-with-daemon
    (with-temp-buffer
      (insert "a text to think about\n")
      (let ((job (rlm-query "slowtest: first token never comes")))
        (should (rlm-test-wait-for
                 (lambda () (string-match-p "rlm: reading the prompt: [0-9.]+k? tokens"
                                            (rlm-test-header job)))
                 15))
        (rlm-cancel-job job)))))

(provide 'rlm-features-tests)
;;; rlm-features-tests.el ends here
